"""The residency planner's arithmetic, and the block streamer's correctness on the CPU.

The planner is checked against a brute force over every subset of resident blocks; the
streamer runs a small stack of diffsynth's own FLUX blocks and must give exactly the output of
the same blocks with the same (float8-rounded) weights left as plain bf16 modules.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.flux.residency import (
    BF16,
    DEFAULT_TRANSFER_COMPUTE_RATIO,
    FLUX_LAYER_CAST_BYTES,
    FP8,
    GIB,
    MIB,
    STREAMED,
    ResidencyError,
    ResidencyPlan,
    activation_reserve_bytes,
    dit_activation_bytes,
    flux_dev_block_sizes,
    minimum_budget_bytes,
    pass_cost,
    plan_residency,
    vae_decode_bytes,
)

# -- planner ------------------------------------------------------------------------------


def brute_force_streamed(sizes: list[int], budget: int, reserve: int, fixed: int,
                         slots: int, phase: int) -> int | None:
    """The fewest bytes streamed over every choice of fp8-resident blocks (no bf16), with the
    memory sums written out here rather than taken from ResidencyPlan."""
    best = None
    for keep in itertools.product((False, True), repeat=len(sizes)):
        resident = sum(s for s, k in zip(sizes, keep, strict=True) if k)
        streamed = [s for s, k in zip(sizes, keep, strict=True) if not k]
        # the bf16 work buffer (twice the largest block) and the float8 staging slots
        buffers = 2 * max(sizes) + slots * max(streamed, default=0)
        peak = fixed + resident + max(buffers + reserve, phase)
        if peak <= budget and (best is None or sum(streamed) < best):
            best = sum(streamed)
    return best


sizes_st = st.lists(st.sampled_from([100, 150, 340, 512]), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_st, budget=st.integers(1, 6000), reserve=st.integers(0, 500),
       fixed=st.integers(0, 100), slots=st.integers(1, 3), phase=st.integers(0, 3000))
def test_planner_streams_the_fewest_bytes_and_stays_within_budget(sizes, budget, reserve,
                                                                  fixed, slots, phase):
    best = brute_force_streamed(sizes, budget, reserve, fixed, slots, phase)
    try:
        plan = plan_residency(sizes, budget, reserve, fixed_bytes=fixed, slots=slots,
                              phase_reserve_bytes=phase, transfer_compute_ratio=0)
    except ResidencyError:
        assert best is None
        assert budget < minimum_budget_bytes(sizes, reserve, fixed, slots,
                                             phase_reserve_bytes=phase)
        return
    kept = plan.fixed_bytes + plan.resident_bytes
    assert kept + plan.buffer_bytes + reserve <= budget and kept + phase <= budget
    if plan.count(BF16) == len(sizes):
        return  # everything resident in bf16 (nothing to stream, nothing to cast)
    assert best is not None and plan.streamed_bytes == best


@settings(max_examples=100, deadline=None)
@given(sizes=sizes_st, budget=st.integers(1, 6000), extra=st.integers(0, 3000))
def test_a_larger_budget_never_streams_more_nor_plans_a_slower_pass(sizes, budget, extra):
    """With the default ratio the planner minimises the pass-time estimate, which a larger
    budget may reach by streaming more bytes of another block size (found by hypothesis:
    sizes 340, 340, 340, 512); minimising bytes alone (ratio 0), it never streams more."""
    def planned(b: int, ratio: float) -> ResidencyPlan | None:
        try:
            return plan_residency(sizes, b, 50, transfer_compute_ratio=ratio)
        except ResidencyError:
            return None

    for ratio in (0.0, DEFAULT_TRANSFER_COMPUTE_RATIO):
        small, large = planned(budget, ratio), planned(budget + extra, ratio)
        if small is None:
            continue
        assert large is not None
        assert ((pass_cost(large, ratio), large.streamed_bytes)
                <= (pass_cost(small, ratio), small.streamed_bytes))


def brute_force_cost(sizes: list[int], budget: int, ratio: float) -> float:
    """The lowest pass-time estimate over every choice of fp8-resident blocks, computed here:
    per size group, max(total bytes, ratio * streamed bytes)."""
    best = math.inf
    for keep in itertools.product((False, True), repeat=len(sizes)):
        streamed = [s for s, k in zip(sizes, keep, strict=True) if not k]
        peak = (sum(sizes) - sum(streamed) + 2 * max(sizes)
                + 2 * max(streamed, default=0))
        if peak > budget:
            continue
        cost = sum(max(sizes.count(g) * g, ratio * streamed.count(g) * g) for g in set(sizes))
        best = min(best, cost)
    return best


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.sampled_from([100, 240]), min_size=2, max_size=9),
       budget=st.integers(500, 3000), ratio=st.sampled_from([0.8, 1.5, 3.0]))
def test_planner_minimises_the_pass_time_estimate(sizes, budget, ratio):
    try:
        plan = plan_residency(sizes, budget, 0, transfer_compute_ratio=ratio, allow_bf16=False)
    except ResidencyError:
        assert brute_force_cost(sizes, budget, ratio) == math.inf
        return
    assert pass_cost(plan, ratio) == brute_force_cost(sizes, budget, ratio)


def test_flux_at_8_gib_streams_both_block_types_alike():
    """The case measured on the H100: with most double blocks streamed the double-block stretch
    was transfer-bound; the planner now streams a similar share of each type."""
    sizes = flux_dev_block_sizes()
    plan = plan_residency(sizes, 8 * GIB, dit_activation_bytes(1024, 1024),
                          fixed_bytes=300 * MIB, phase_reserve_bytes=vae_decode_bytes(1024, 1024))
    doubles = plan.placements[:19].count(STREAMED) / 19
    singles = plan.placements[19:].count(STREAMED) / 38
    assert 0 < doubles and 0 < singles and abs(doubles - singles) < 0.2
    only_bytes = plan_residency(sizes, 8 * GIB, dit_activation_bytes(1024, 1024),
                                fixed_bytes=300 * MIB, transfer_compute_ratio=0,
                                phase_reserve_bytes=vae_decode_bytes(1024, 1024))
    assert pass_cost(plan, 1.5) < pass_cost(only_bytes, 1.5)


def test_everything_bf16_when_it_fits():
    sizes = [300, 300, 100]
    plan = plan_residency(sizes, budget_bytes=2 * 700 + 200 + 50, reserve_bytes=200,
                          fixed_bytes=50)
    assert plan.placements == (BF16, BF16, BF16)
    assert plan.work_bytes == 0 and plan.slot_bytes == 0 and plan.streamed_bytes == 0


def test_headroom_goes_to_bf16_copies_once_nothing_is_streamed():
    sizes = [300, 300, 100]
    # fp8 all resident needs 700 + work 600 (bf16 of the largest); 300 left for upgrades
    plan = plan_residency(sizes, budget_bytes=700 + 600 + 300, reserve_bytes=0)
    assert plan.streamed_bytes == 0
    assert plan.count(BF16) >= 1 and plan.headroom_bytes >= 0
    # no further block could become bf16 without going over
    for i, p in enumerate(plan.placements):
        if p == FP8:
            more = list(plan.placements)
            more[i] = BF16
            assert ResidencyPlan(**{**plan.__dict__, "placements": tuple(more)}).headroom_bytes < 0


def test_no_bf16_when_disallowed():
    plan = plan_residency([10, 10], budget_bytes=10_000, reserve_bytes=0, allow_bf16=False)
    assert plan.placements == (FP8, FP8)


def test_too_small_a_budget_says_what_is_needed():
    sizes = flux_dev_block_sizes()
    reserve = activation_reserve_bytes(1024, 1024)
    need = minimum_budget_bytes(sizes, reserve)
    with pytest.raises(ResidencyError, match=r"at least \d+\.\d\d GiB"):
        plan_residency(sizes, need - 1, reserve)
    plan = plan_residency(sizes, need, reserve)
    assert plan.count(STREAMED) == len(sizes)


@pytest.mark.parametrize("bad", [dict(block_sizes_bytes=[]), dict(block_sizes_bytes=[0, 5]),
                                 dict(budget_bytes=0), dict(reserve_bytes=-1), dict(slots=0)])
def test_bad_arguments_are_refused(bad):
    args = dict(block_sizes_bytes=[10, 10], budget_bytes=1000, reserve_bytes=0) | bad
    slots = args.pop("slots", 2)
    with pytest.raises(ValueError):
        plan_residency(**args, slots=slots)


def test_flux_dev_sizes_and_resident_blocks_are_spread_out():
    sizes = flux_dev_block_sizes()
    assert len(sizes) == 57 and abs(sum(sizes) / 1e9 - 11.84) < 0.01
    plan = plan_residency(sizes, 8 * GIB, activation_reserve_bytes(1024, 1024),
                          fixed_bytes=150 * MIB)
    kept = [i for i, p in enumerate(plan.placements) if p != STREAMED]
    assert 0 < len(kept) < 57 and plan.headroom_bytes >= 0
    # within each block type the streamed runs between resident blocks differ by at most one
    for lo, hi in ((0, 19), (19, 57)):
        ks = [i for i in kept if lo <= i < hi]
        if len(ks) >= 2:
            gaps = [b - a for a, b in itertools.pairwise(ks)]
            assert max(gaps) - min(gaps) <= 1


def test_flux_dev_plans_shrink_streaming_as_the_budget_grows():
    sizes, reserve = flux_dev_block_sizes(), activation_reserve_bytes(1024, 1024)
    streamed = [plan_residency(sizes, gib * GIB, reserve).streamed_bytes for gib in (6, 8, 12, 16)]
    assert streamed == sorted(streamed, reverse=True) and streamed[0] > streamed[-1]
    assert plan_residency(sizes, 40 * GIB, reserve).count(BF16) == 57


def test_activation_reserve_grows_with_the_image_and_tiling_caps_the_vae():
    small, large = activation_reserve_bytes(512, 512), activation_reserve_bytes(1024, 1024)
    assert large > small > 0
    assert activation_reserve_bytes(2048, 2048, vae_tiled=True) < activation_reserve_bytes(
        2048, 2048)
    with pytest.raises(ValueError):
        activation_reserve_bytes(0, 512)


def test_the_phase_reserve_can_use_the_released_buffers_but_not_more():
    sizes = [100] * 10
    # denoising: fixed 0 + resident + work 200 + 2 slots 200 + reserve 100
    loop_only = plan_residency(sizes, 1000, 100, allow_bf16=False)
    assert loop_only.count(FP8) == 5  # 500 + 500 = 1000
    # a VAE phase needing 500 fits in the buffers' 400 + reserve 100: same plan
    same = plan_residency(sizes, 1000, 100, phase_reserve_bytes=500, allow_bf16=False)
    assert same.placements == loop_only.placements
    # one needing 700 does not: fewer resident blocks
    less = plan_residency(sizes, 1000, 100, phase_reserve_bytes=700, allow_bf16=False)
    assert less.count(FP8) == 3 and less.peak_bytes <= 1000


def test_transfer_floor():
    plan = plan_residency([100, 100, 100], budget_bytes=100 + 200 + 200 + 1, reserve_bytes=0)
    assert plan.transfer_floor_s(100.0) == plan.streamed_bytes / 100.0


# -- streaming wrapper on the CPU ---------------------------------------------------------

torch = pytest.importorskip("torch")
flux_dit = pytest.importorskip("diffsynth.models.flux_dit")

from engine.flux.streaming import (  # noqa: E402
    CastLinear,
    dit_blocks,
    enable_block_streaming,
    largest_casts_bytes,
    measure_blocks,
)

DIM, HEADS = 64, 2


class TinyDiT(torch.nn.Module):
    """diffsynth's FLUX blocks at a small width, called the way ``model_fn_flux_image`` does."""

    def __init__(self, n_double: int = 3, n_single: int = 4) -> None:
        super().__init__()
        self.pos_embedder = flux_dit.RoPEEmbedding(DIM // HEADS, 10000, [8, 12, 12])
        self.x_embedder = torch.nn.Linear(16, DIM)
        self.blocks = torch.nn.ModuleList(
            [flux_dit.FluxJointTransformerBlock(DIM, HEADS) for _ in range(n_double)])
        self.single_blocks = torch.nn.ModuleList(
            [flux_dit.FluxSingleTransformerBlock(DIM, HEADS) for _ in range(n_single)])
        self.proj_out = torch.nn.Linear(DIM, 16)

    def forward(self, x, prompt, temb, ids, blocks=None):
        rope = self.pos_embedder(ids)
        h = self.x_embedder(x)
        for block in self.blocks if blocks is None else blocks[0]:
            h, prompt = block(h, prompt, temb, rope)
        h = torch.cat([prompt, h], dim=1)
        for block in self.single_blocks if blocks is None else blocks[1]:
            h, prompt = block(h, prompt, temb, rope)
        return self.proj_out(h[:, prompt.shape[1]:])


def make_models(seed: int = 0):
    """(float8 model to stream, bf16 reference with the same float8-rounded weights)."""
    torch.manual_seed(seed)
    model = TinyDiT()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model = model.to(torch.float8_e4m3fn)
    return model, copy.deepcopy(model).to(torch.bfloat16)


def make_inputs(seed: int = 1, img: int = 12, txt: int = 5, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.zeros(batch, txt, 3), torch.rand(batch, img, 3, generator=g) * 8],
                    dim=1)
    return (torch.randn(batch, img, 16, generator=g).bfloat16(),
            torch.randn(batch, txt, DIM, generator=g).bfloat16(),
            torch.randn(batch, DIM, generator=g).bfloat16(), ids)


def plan_for(model, placements):
    sizes, fixed = measure_blocks(model)
    return ResidencyPlan(tuple(placements), tuple(sizes), 10**12, 0, fixed, slots=2)


MIXED = [STREAMED, FP8, STREAMED, STREAMED, BF16, STREAMED, FP8]


@pytest.mark.parametrize("placements", [MIXED, [STREAMED] * 7, [FP8] * 7, [BF16] * 7,
                                        [STREAMED] + [BF16] * 6])
def test_streamed_output_equals_the_plain_modules(placements, layer_cast):
    model, reference = make_models()
    handle = enable_block_streaming(model, plan_for(model, placements), "cpu",
                                    layer_cast=layer_cast)
    with torch.no_grad():
        for seed in (1, 2, 3):  # several passes: the prefetch wraps around between them
            inputs = make_inputs(seed)
            torch.testing.assert_close(model(*inputs), reference(*inputs), rtol=0, atol=0)
    stats = handle.stats()
    assert stats["passes"] == 3 and stats["restarts"] == (1 if STREAMED in placements else 0)
    plan = handle.plan
    first = [plan.block_bytes[i] for i in plan.streamed[:2]]  # next pass, already prefetched
    assert stats["bytes_streamed"] == 3 * plan.streamed_bytes + sum(first)
    handle.close()


def test_blocks_called_out_of_order_still_compute_right(layer_cast):
    model, reference = make_models()
    handle = enable_block_streaming(model, plan_for(model, MIXED), "cpu",
                                    layer_cast=layer_cast)
    skip = ([model.blocks[0], model.blocks[2]], [model.single_blocks[1], model.single_blocks[3]])
    ref_skip = ([reference.blocks[0], reference.blocks[2]],
                [reference.single_blocks[1], reference.single_blocks[3]])
    with torch.no_grad():
        for seed in (1, 2):
            inputs = make_inputs(seed)
            torch.testing.assert_close(model(*inputs, blocks=skip),
                                       reference(*inputs, blocks=ref_skip), rtol=0, atol=0)
            torch.testing.assert_close(model(*inputs), reference(*inputs), rtol=0, atol=0)
    assert handle.stats()["restarts"] >= 2
    handle.close()


def test_released_buffers_come_back_on_the_next_call(layer_cast):
    model, reference = make_models()
    handle = enable_block_streaming(model, plan_for(model, MIXED), "cpu",
                                    layer_cast=layer_cast)
    handle.follow_pipeline_phases()
    with torch.no_grad():
        for seed in (1, 2):
            inputs = make_inputs(seed)
            torch.testing.assert_close(model(*inputs), reference(*inputs), rtol=0, atol=0)
            model.offload()  # what diffsynth's load_models_to_device does before the VAE
            assert handle._work is None and handle._slots == []
            assert all(p.numel() == 0 for p in model.blocks[0].parameters() if p.dim() >= 2)
            model.onload()
    assert handle.stats()["releases"] == 2 and handle.stats()["passes"] == 2
    handle.close()
    assert not hasattr(model, "offload") and not getattr(model, "vram_management_enabled", False)
    with torch.no_grad():
        inputs = make_inputs(5)
        torch.testing.assert_close(model.to(torch.bfloat16)(*inputs), reference(*inputs),
                                   rtol=0, atol=0)


def test_close_puts_the_same_float8_weights_back_on_the_cpu(layer_cast):
    model, reference = make_models()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with enable_block_streaming(model, plan_for(model, MIXED), "cpu", layer_cast=layer_cast):
        with torch.no_grad():
            model(*make_inputs())
    for name, p in model.named_parameters():
        assert p.device.type == "cpu"
        if p.dim() >= 2 and ("blocks" in name):
            assert p.dtype == torch.float8_e4m3fn
        assert torch.equal(p.detach().float(), before[name].float()), name
    assert_usable_as_a_plain_module(model, reference)


def assert_usable_as_a_plain_module(model, reference, seed: int = 4) -> None:
    """After ``close()``: the CPU float8 module, cast to bf16, computes what the reference
    does, so the same float8 weights came back, in plain ``nn.Linear`` layers again."""
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(isinstance(m, CastLinear) for m in model.modules())
    with torch.no_grad():
        inputs = make_inputs(seed)
        torch.testing.assert_close(model.to(torch.bfloat16)(*inputs), reference(*inputs),
                                   rtol=0, atol=0)


def test_measure_blocks_counts_packed_weights_and_the_rest():
    model, _ = make_models()
    sizes, fixed = measure_blocks(model)
    blocks = dit_blocks(model)
    assert len(sizes) == len(blocks) == 7
    for size, block in zip(sizes, blocks, strict=True):
        weights = sum(p.numel() for p in block.parameters() if p.dim() >= 2)
        assert weights <= size < weights + 256 * len(list(block.parameters()))
    others = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for b in blocks for p in b.parameters() if p.dim() >= 2)
    assert fixed == 2 * others


def test_layer_cast_keeps_no_work_buffer_and_computes_from_the_float8_buffers():
    """The DiT's mode: each linear layer casts its own weight, which is a view of its block's
    float8 buffer (fp8) or of the staging slot it was copied into (streamed)."""
    model, reference = make_models()
    handle = enable_block_streaming(model, plan_for(model, MIXED), "cpu", layer_cast=True)
    with torch.no_grad():
        inputs = make_inputs(1)
        torch.testing.assert_close(model(*inputs), reference(*inputs), rtol=0, atol=0)
    assert handle._work is None
    blocks = dit_blocks(model)
    for block, placement in zip(handle._blocks, MIXED, strict=True):
        module = blocks[block.index]
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(type(m) is CastLinear for m in linears)
        weights = [m.weight for m in linears]
        if placement == FP8:
            start = block.source.data_ptr()
            assert all(w.dtype == torch.float8_e4m3fn
                       and start <= w.data_ptr() < start + block.source.nbytes for w in weights)
        if placement == BF16:
            assert all(w.dtype == torch.bfloat16 for w in weights)
        if placement == STREAMED:  # the staging slot its last call used
            assert any(all(slot.data_ptr() <= w.data_ptr() < slot.data_ptr() + slot.nbytes
                           for w in weights) for slot in handle._slots)
    handle.close()
    assert_usable_as_a_plain_module(model, reference)


def test_layer_cast_refuses_a_weight_matrix_outside_a_linear_layer():
    model, _ = make_models()
    model.blocks[1].extra = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="extra"):
        enable_block_streaming(model, plan_for(model, MIXED), "cpu", layer_cast=True)
    assert not any(isinstance(m, CastLinear) for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_largest_casts_are_flux_devs_two_largest_layers():
    from diffsynth.models.flux_dit import FluxDiT

    model, _ = make_models()
    single = model.single_blocks[0]
    two = sorted((p.numel() for p in single.parameters() if p.dim() >= 2), reverse=True)[:2]
    assert largest_casts_bytes(model) == 2 * sum(two)
    with torch.device("meta"):
        flux = FluxDiT()
    assert largest_casts_bytes(flux) == FLUX_LAYER_CAST_BYTES


def test_refuses_a_managed_dit_and_a_plan_of_the_wrong_length():
    model, _ = make_models()
    with pytest.raises(ValueError, match="plan has 3 placements"):
        enable_block_streaming(model, ResidencyPlan((FP8,) * 3, (1, 1, 1), 10**9, 0, 0, 2),
                               "cpu")
    model.vram_management_enabled = True
    with pytest.raises(ValueError, match="unmanaged"):
        enable_block_streaming(model, plan_for(TinyDiT(), MIXED), "cpu")


def test_an_unknown_cast_kind_is_refused_before_anything_moves():
    model, _ = make_models()
    with pytest.raises(ValueError, match="cast must be"):
        enable_block_streaming(model, plan_for(model, MIXED), "cpu", cast="fast")
    assert all(p.dtype == torch.float8_e4m3fn for p in model.parameters())


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(torch.float8_e4m3fn)


def test_t5_encoder_streamed_block_by_block_equals_the_plain_encoder():
    """The same streamer drives transformers' T5 encoder (``encoder.block``), as ``low`` does."""
    from engine.flux.residency import STREAMED as S
    from engine.flux.streaming import dit_blocks

    model = tiny_t5()
    reference = copy.deepcopy(model).to(torch.bfloat16)
    blocks = ("encoder.block",)
    assert len(dit_blocks(model, blocks)) == 3
    sizes, fixed = measure_blocks(model, block_lists=blocks)
    plan = ResidencyPlan((S,) * 3, tuple(sizes), 10**12, 0, fixed, slots=2)
    handle = enable_block_streaming(model, plan, "cpu", block_lists=blocks)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for _ in range(2):  # a second image: the prefetch wraps around
            got = model(input_ids=ids).last_hidden_state
            want = reference(input_ids=ids).last_hidden_state
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert handle.stats()["streamed_blocks"] == 3 and handle.stats()["passes"] >= 2
    handle.close()


def test_t5_streaming_releases_its_buffers_at_diffsynths_phase_change():
    """In ``balanced`` no model is under diffsynth's VRAM management (CLIP and the VAE are plain
    resident), so diffsynth would skip its phase changes; start_t5_streaming turns them on so
    that T5's buffers are given back before the DiT runs."""
    from diffsynth.diffusion.base_pipeline import BasePipeline

    from engine.flux.pipeline import start_t5_streaming
    from engine.flux.presets import make_plan

    class Pipe(torch.nn.Module):
        load_models_to_device = BasePipeline.load_models_to_device
        device_type = "cpu"
        vram_management_enabled = False

        def __init__(self):
            super().__init__()
            self.text_encoder_2 = tiny_t5()
            self.dit = torch.nn.Linear(2, 2)

    pipe = Pipe()
    plan = make_plan("balanced", "cpu", 20.0, stream_dit=True)
    assert plan.stream_t5
    handle = start_t5_streaming(pipe, plan)
    assert pipe.vram_management_enabled and handle._work is None  # nothing held until T5 runs
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    pipe.load_models_to_device(["text_encoder_2"])
    with torch.no_grad():
        pipe.text_encoder_2(input_ids=ids)
    assert handle._work is not None and handle._slots
    releases = handle.stats()["releases"]
    pipe.load_models_to_device(["dit"])
    assert handle._work is None and not handle._slots
    assert handle.stats()["releases"] == releases + 1
    handle.close()


def test_t5_phase_covers_the_t5_streamers_buffers_for_flux_t5_xxl():
    """The constant behind ``t5_phase_bytes`` is T5-XXL's real block: measured on the model
    built from FLUX's text_encoder_2 config (on the meta device, no weights)."""
    from transformers import T5Config, T5EncoderModel

    from engine.flux.residency import T5_BLOCK_WEIGHTS, t5_phase_bytes

    config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240,
                      num_layers=24, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = T5EncoderModel(config)
    sizes, _ = measure_blocks(model, block_lists=("encoder.block",))
    assert max(sizes) == pytest.approx(T5_BLOCK_WEIGHTS, rel=1e-4)  # float8: one byte each
    work_and_two_slots = 2 * max(sizes) + 2 * max(sizes)
    assert work_and_two_slots < t5_phase_bytes() < work_and_two_slots + GIB
