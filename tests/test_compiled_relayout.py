"""A re-plan under compiled blocks (engine/flux/pipeline.py ``compile_dit_blocks``): with
``model.layer_cast`` the streamer moves blocks between bf16 and float8 by assigning their
weights' data in place, and the compiled blocks must then run the graph of the new dtype.

torch 2.11's dynamo skipped the dtype guards of a module whose dicts were unchanged and ran the
old dtype's graph: on an H100 the calibration's re-plan at 15.5 GiB failed with "self and mat2
must have the same dtype" and the bot fell back to eager blocks (4.7 s instead of 3.0 s an
image). This test fails that way on torch 2.11 without the guard setting in
``compile_dit_blocks``; torch 2.14 (this project's CI) checks those guards anyway.

Compiled blocks round differently from eager ones (inductor fuses in float32), so the images
compiled before the re-plans are the reference; a stale graph gives values near 1e10."""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo.testing

from engine.flux.pipeline import compile_dit_blocks, uncompile_dit_blocks
from engine.flux.residency import BF16, FP8
from engine.flux.streaming import enable_block_streaming
from tests.test_residency import make_inputs, make_models, plan_for
from tests.test_streaming_faults import replan

# image tokens and batch: two sizes and a batch, as the warm-up compiles them (static, then
# dynamic graphs)
SHAPES = [(16, 1), (4, 1), (16, 3)]
# the first block of each type changes dtype both ways: the blocks that compiled the graphs
BEFORE = [BF16, FP8, FP8, BF16, FP8, FP8, FP8]
AFTER = [FP8, BF16, FP8, FP8, BF16, FP8, FP8]


@pytest.fixture
def counted_compile(monkeypatch):
    """``torch.compile`` (inductor) behind a frame counter, on a fresh dynamo; dynamo's settings
    come back afterwards."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    settings = {name: getattr(torch._dynamo.config, name)
                for name in ("recompile_limit", "skip_tensor_guards_with_matching_dict_tags")
                if hasattr(torch._dynamo.config, name)}
    torch._dynamo.reset()
    with torch._dynamo.config.patch(settings):  # compile_dit_blocks changes them
        yield counter
    torch._dynamo.reset()


@pytest.mark.parametrize("layer_cast", [True, False], ids=["layer-cast", "block-cast"])
def test_compiled_blocks_compute_the_same_after_a_replan_moves_blocks_between_dtypes(
        layer_cast, counted_compile):
    model, _ = make_models()
    handle = enable_block_streaming(model, plan_for(model, BEFORE), "cpu", layer_cast=layer_cast)
    compile_dit_blocks(model)
    # what makes torch 2.11 check the dtype guards (2.14 checks them anyway)
    assert getattr(torch._dynamo.config, "skip_tensor_guards_with_matching_dict_tags",
                   False) is False
    try:
        with torch.no_grad():
            expected = [model(*make_inputs(img=img, batch=batch)) for img, batch in SHAPES]
            for placements in (AFTER, BEFORE):
                handle.relayout(replan(handle, placements))
                assert handle.plan.placements == tuple(placements)
                for (img, batch), want in zip(SHAPES, expected, strict=True):
                    # a static and a dynamic-shape graph may sum in another order
                    got = model(*make_inputs(img=img, batch=batch))
                    torch.testing.assert_close(got, want, rtol=1e-2,
                                               atol=1e-2 * want.abs().max().item())
    finally:
        uncompile_dit_blocks(model)
        handle.close()
    assert counted_compile.frame_count >= 2  # the blocks ran compiled, not eager


def test_compiled_float8_matmuls_follow_the_blocks_between_float8_and_bf16(counted_compile):
    """float8_compute on the streamed DiT (Float8CastLinear): each layer branches on its
    weight's dtype, so a re-plan that turns float8 blocks into bf16 copies and back must reach
    the compiled graphs too (a stale graph would hand _scaled_mm a bf16 weight, or cast a
    float8 one). Float8 rounds the activations, and a compiled block's bf16 arithmetic moves
    some of them across a rounding step, so compiled and eager agree only to the float8 error:
    both are held to the bf16 reference, and a layout computes the same before and after."""
    from engine.flux.float8_compute import enable_float8_matmuls
    from tests.test_float8_compute import rel_error

    model, reference = make_models()
    handle = enable_block_streaming(model, plan_for(model, BEFORE), "cpu", layer_cast=True)
    enable_float8_matmuls(model)
    inputs = make_inputs(img=16)
    try:
        with torch.no_grad():
            want = reference(*inputs)
            assert rel_error(model(*inputs), want) < 0.1  # eager
            compile_dit_blocks(model)
            got = []
            for placements in (BEFORE, AFTER, BEFORE):
                handle.relayout(replan(handle, placements))
                got.append(model(*inputs))
                assert 0 < rel_error(got[-1], want) < 0.1
            torch.testing.assert_close(got[2], got[0], rtol=1e-3, atol=1e-3)
            assert not torch.equal(got[0], got[1])  # float8 and bf16 matmuls really switched
    finally:
        uncompile_dit_blocks(model)
        handle.close()
    assert counted_compile.frame_count >= 2
