"""The block streamer after a failure: an exception in any block's hook or forward, or an
out-of-memory error while its buffers are made, leaves it able to compute the next pass
exactly; ``relayout`` moves blocks between placements without a second copy of the DiT, and
rolls back when a move fails. CPU, on the tiny DiT of ``test_residency``."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth.models.flux_dit")

from engine.flux.residency import BF16, FP8, STREAMED  # noqa: E402
from engine.flux.streaming import dit_blocks, enable_block_streaming  # noqa: E402
from tests.test_residency import (  # noqa: E402
    MIXED,
    assert_usable_as_a_plain_module,
    make_inputs,
    make_models,
    plan_for,
)


class Boom(RuntimeError):
    pass


def replan(handle, placements):
    """The handle's plan with other placements (a live model's streamed weights may be views
    of nothing between calls, so it is not measured again)."""
    return dataclasses.replace(handle.plan, placements=tuple(placements))


def assert_matches(model, reference, seed: int) -> None:
    inputs = make_inputs(seed)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), reference(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("where", range(7))
@pytest.mark.parametrize("placements", [MIXED, [STREAMED] * 7])
def test_an_exception_in_any_block_leaves_the_next_pass_exact(where, placements,
                                                             layer_cast):
    model, reference = make_models()
    handle = enable_block_streaming(model, plan_for(model, placements), "cpu",
                                    layer_cast=layer_cast)
    handle.follow_pipeline_phases()
    assert_matches(model, reference, 1)  # prefetch state mid-stream, as in a running bot
    failing = dit_blocks(model)[where]

    def explode(module, args):
        raise Boom("out of memory in the middle of a pass")

    hook = failing.register_forward_pre_hook(explode)  # after the streamer's own hook
    with pytest.raises(Boom), torch.no_grad():
        model(*make_inputs(2))
    hook.remove()
    assert_matches(model, reference, 3)  # straight after, with no clean-up at all
    handle.release_buffers()  # what the backend does after a failed pass
    assert_matches(model, reference, 4)
    handle.close()


def test_running_out_of_memory_while_making_the_buffers_leaves_no_half_state(monkeypatch,
                                                                            layer_cast):
    """The old bug: the work buffer was kept, the slots were not, and every later pass raised
    ``IndexError: pop from an empty deque``."""
    model, reference = make_models()
    handle = enable_block_streaming(model, plan_for(model, MIXED), "cpu",
                                    layer_cast=layer_cast)
    handle.release_buffers()
    real_empty = torch.empty
    calls = {"n": 0}

    def empty_failing_on_the_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the work buffer was made, the first slot fails
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty_failing_on_the_second)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        model(*make_inputs(1))
    monkeypatch.setattr(torch, "empty", real_empty)
    assert handle._work is None and handle._slots == []
    for seed in (2, 3):
        assert_matches(model, reference, seed)
    handle.close()


@pytest.mark.parametrize("before,after", [
    (MIXED, [STREAMED] * 7),
    ([BF16] * 7, MIXED),
    ([FP8] * 7, [STREAMED, BF16, STREAMED, FP8, STREAMED, STREAMED, BF16]),
    ([STREAMED] * 7, [BF16] * 7),
])
def test_relayout_moves_blocks_and_computes_the_same(before, after, layer_cast):
    model, reference = make_models()
    handle = enable_block_streaming(model, plan_for(model, before), "cpu",
                                    layer_cast=layer_cast)
    assert_matches(model, reference, 1)
    handle.relayout(replan(handle, after))
    assert handle.plan.placements == tuple(after)
    assert [b.placement for b in handle._blocks] == list(after)
    assert handle.stats()["streamed_blocks"] == after.count(STREAMED)
    for seed in (2, 3):
        assert_matches(model, reference, seed)
    handle.close()
    assert_usable_as_a_plain_module(model, reference, seed=5)


def test_relayout_adds_only_the_moved_blocks_to_the_host(layer_cast):
    model, _ = make_models()
    resident = [FP8] * 7
    handle = enable_block_streaming(model, plan_for(model, resident), "cpu",
                                    layer_cast=layer_cast)
    assert handle.stats()["host_bytes"] == 0
    after = [STREAMED, FP8, FP8, STREAMED, FP8, FP8, FP8]
    handle.relayout(replan(handle, after))
    moved = handle.plan.block_bytes[0] + handle.plan.block_bytes[3]
    assert handle.stats()["host_bytes"] == moved == handle.plan.streamed_bytes
    # every block's float8 bytes live in exactly one place
    sources = [b.source for b in handle._blocks]
    assert len({s.data_ptr() for s in sources}) == 7
    handle.close()


def test_a_failed_relayout_rolls_back_to_the_working_plan(monkeypatch, layer_cast):
    model, reference = make_models()
    handle = enable_block_streaming(model, plan_for(model, MIXED), "cpu",
                                    layer_cast=layer_cast)
    old = handle.plan
    moves = {"n": 0}
    real_move = type(handle)._move

    def move_failing_on_the_third(self, block, target):
        moves["n"] += 1
        if moves["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_move(self, block, target)

    monkeypatch.setattr(type(handle), "_move", move_failing_on_the_third)
    with pytest.raises(torch.OutOfMemoryError):
        handle.relayout(replan(handle, [BF16] * 7))
    monkeypatch.setattr(type(handle), "_move", real_move)
    assert handle.plan == old
    assert [b.placement for b in handle._blocks] == list(old.placements)
    for seed in (1, 2):
        assert_matches(model, reference, seed)
    handle.close()
