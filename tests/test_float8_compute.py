"""Float8 compute for the DiT's linear layers: the scaling arithmetic and diffsynth's real blocks.

torch's CPU build runs ``torch._scaled_mm`` with row scales, so the real kernel call is tested
here; the GPU test (tests/gpu) checks the same on an H100 and the whole DiT's error.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from diffsynth.models.flux_dit import (  # noqa: E402
    FluxJointTransformerBlock,
    FluxSingleTransformerBlock,
    RoPEEmbedding,
)

from engine.flux.float8_compute import (  # noqa: E402
    FP8_MAX,
    Float8Linear,
    check_float8_matmul,
    enable_float8_compute,
    quantize_rows,
)

BF16 = torch.bfloat16
DIM, HEADS = 64, 2  # head_dim 32, like FLUX's 3072 / 24 = 128 in miniature


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


def test_quantize_rows_uses_the_whole_float8_range_of_every_row():
    x = torch.randn(5, 48) * torch.tensor([[1e-3], [1.0], [30.0], [0.02], [0.0]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    amax = q.float().abs().amax(dim=1)
    assert torch.equal(amax[:4], torch.full((4,), FP8_MAX))  # each row's largest value is 448
    assert torch.isfinite(scale).all() and not q.float()[4].any()  # a zero row stays zero
    # e4m3 keeps 3 mantissa bits: each element within 1/16 of its value, whatever the row's size
    back = q.float() * scale
    assert torch.all((back - x).abs() <= x.abs() / 16 + 1e-12)


def test_float8_linear_applies_both_scales_like_the_dequantized_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48).to(BF16)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-2, 1, 48).unsqueeze(1).to(BF16))  # rows of any size
    layer = Float8Linear.from_linear(linear)
    x = (torch.randn(3, 7, 96) * torch.logspace(-1, 1, 7).unsqueeze(1)).to(BF16)
    got = layer(x)
    assert got.shape == (3, 7, 48) and got.dtype == BF16
    xq, xs = quantize_rows(x.reshape(-1, 96))
    dequantized = (xq.float() * xs) @ (layer.weight.float() * layer.weight_scale.t()).t()
    want = (dequantized + linear.bias.float()).reshape(3, 7, 48)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    assert rel_error(got, linear(x)) < 0.05  # and close to the bf16 layer itself


def test_float8_linear_without_bias():
    linear = torch.nn.Linear(32, 16, bias=False).to(BF16)
    layer = Float8Linear.from_linear(linear)
    assert layer.bias is None
    x = torch.randn(4, 32, dtype=BF16)
    assert rel_error(layer(x), linear(x)) < 0.05


class TinyDiT(torch.nn.Module):
    """diffsynth's own FLUX block classes at a small width, under the DiT's attribute names."""

    def __init__(self) -> None:
        super().__init__()
        self.x_embedder = torch.nn.Linear(16, DIM)  # outside the blocks: stays bf16
        self.blocks = torch.nn.ModuleList(FluxJointTransformerBlock(DIM, HEADS) for _ in range(2))
        self.single_blocks = torch.nn.ModuleList(
            FluxSingleTransformerBlock(DIM, HEADS) for _ in range(2))

    def forward(self, img, txt, temb, rope):
        a = self.x_embedder(img)
        for block in self.blocks:
            a, txt = block(a, txt, temb, rope)
        a = torch.cat([txt, a], dim=1)
        for block in self.single_blocks:
            a, txt = block(a, txt, temb, rope)
        return a


def tiny_inputs(tokens: int = 12, text: int = 4):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (1, text + tokens, 3), generator=g).float()
    rope = RoPEEmbedding(DIM, 10000, [8, 12, 12])(ids)
    return (torch.randn(1, tokens, 16, generator=g).to(BF16),
            torch.randn(1, text, DIM, generator=g).to(BF16),
            torch.randn(1, DIM, generator=g).to(BF16), rope)


def tiny_dit() -> TinyDiT:
    torch.manual_seed(0)
    return TinyDiT().to(BF16).eval()


def test_enable_converts_the_blocks_large_linears_and_keeps_the_modulation_in_bf16():
    dit = tiny_dit()
    report = enable_float8_compute(dit)
    # per joint block: qkv a/b, out a/b, two feed-forward pairs = 8; per single block: 2
    assert report.layers == 2 * 8 + 2 * 2
    assert report.kept == 2 * 2 + 2  # AdaLayerNorm(.linear) twice per joint block, once per single
    for block in dit.blocks:
        assert isinstance(block.attn.a_to_qkv, Float8Linear)
        assert isinstance(block.ff_b[2], Float8Linear)
        assert type(block.norm1_a.linear) is torch.nn.Linear
    assert type(dit.x_embedder) is torch.nn.Linear
    # float8 weights + a float32 scale per row: a bit over half of the bf16 bytes
    assert 0.5 < report.bytes_after / report.bytes_before < 0.56
    assert enable_float8_compute(dit).layers == 0  # idempotent


def test_diffsynth_blocks_in_float8_stay_close_to_bf16():
    dit = tiny_dit()
    reference = copy.deepcopy(dit)
    inputs = tiny_inputs()
    with torch.no_grad():
        want = reference(*inputs)
        enable_float8_compute(dit)
        got = dit(*inputs)
    assert got.shape == want.shape
    assert 0 < rel_error(got, want) < 0.05  # quantized (not bit-equal), yet close


def test_the_cpu_build_runs_row_scaled_float8_matmuls():
    assert check_float8_matmul("cpu") is None


# -- the block-streamed DiT (layer_cast): float8 matmuls on the stored weights ---------------

def streamed_tiny(placements):
    """test_residency's float8 TinyDiT block-streamed with layer_cast on the CPU, and its bf16
    reference (the same float8-rounded weights)."""
    from engine.flux.streaming import enable_block_streaming
    from tests.test_residency import make_models, plan_for

    model, reference = make_models()
    handle = enable_block_streaming(model, plan_for(model, placements), "cpu", layer_cast=True)
    return model, reference, handle


def test_streamed_layers_multiply_the_stored_float8_weights_and_the_modulation_keeps_bf16():
    from engine.flux.float8_compute import Float8CastLinear, enable_float8_matmuls
    from engine.flux.residency import BF16 as BF16_BLOCK
    from engine.flux.residency import FP8 as FP8_BLOCK
    from engine.flux.residency import STREAMED
    from engine.flux.streaming import CastLinear
    from tests.test_residency import make_inputs

    placements = [STREAMED, FP8_BLOCK, STREAMED, BF16_BLOCK, STREAMED, FP8_BLOCK, STREAMED]
    model, reference, handle = streamed_tiny(placements)
    report = enable_float8_matmuls(model)
    # per joint block: qkv a/b, out a/b, two feed-forward pairs = 8; per single block: 2
    assert report.layers == 3 * 8 + 4 * 2 and report.kept == 3 * 2 + 4
    assert report.streamed and "multiply their stored float8 weights" in report.describe()
    for block in model.blocks:
        assert type(block.attn.a_to_qkv) is Float8CastLinear
        assert type(block.norm1_a.linear) is CastLinear  # one token per image: nothing to gain
    assert enable_float8_matmuls(model).layers == 0  # idempotent
    with torch.no_grad():
        for seed in (1, 2):  # streamed blocks read their staging slots; bf16 copies stay bf16
            inputs = make_inputs(seed, batch=2)
            got, want = model(*inputs), reference(*inputs)
            assert got.shape == want.shape
            # each layer rounds its activations to float8 (about 2.5% apart from bf16, the
            # test below); seven blocks of these weights (std 0.2) compound it
            assert 0 < rel_error(got, want) < 0.1
    handle.close()
    assert all(type(m) is torch.nn.Linear for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def test_a_bf16_copy_of_a_block_keeps_the_exact_bf16_matmul():
    from engine.flux.float8_compute import enable_float8_matmuls
    from engine.flux.residency import BF16 as BF16_BLOCK
    from tests.test_residency import make_inputs

    model, reference, handle = streamed_tiny([BF16_BLOCK] * 7)
    assert enable_float8_matmuls(model).layers == 3 * 8 + 4 * 2
    with torch.no_grad():
        inputs = make_inputs(3)
        torch.testing.assert_close(model(*inputs), reference(*inputs), rtol=0, atol=0)
    handle.close()


def test_a_relayout_keeps_the_float8_matmuls_on_the_moved_blocks():
    """An out-of-memory re-plan moves blocks between the GPU, the host and bf16 copies; the
    layers keep their float8 forward, reading wherever their weights now are."""
    from engine.flux.float8_compute import Float8CastLinear, enable_float8_matmuls
    from engine.flux.residency import BF16 as BF16_BLOCK
    from engine.flux.residency import FP8 as FP8_BLOCK
    from engine.flux.residency import STREAMED
    from tests.test_residency import make_inputs
    from tests.test_streaming_faults import replan

    model, reference, handle = streamed_tiny([BF16_BLOCK, FP8_BLOCK] * 3 + [FP8_BLOCK])
    enable_float8_matmuls(model)
    with torch.no_grad():
        before = model(*make_inputs(4))
        handle.relayout(replan(handle, [STREAMED] * 7))
        assert handle.stats()["streamed_blocks"] == 7
        after = model(*make_inputs(4))
        want = reference(*make_inputs(4))
    assert type(model.blocks[0].attn.a_to_qkv) is Float8CastLinear
    assert 0 < rel_error(after, want) < 0.1
    assert 0 < rel_error(before, want) < 0.1
    handle.close()


def test_a_float8_cast_linear_is_the_product_of_the_per_token_scaled_activations():
    """The layer's result is exactly (up to bf16 output rounding) x quantized per token times
    the stored float8 weight, scale 1: the weights are the ones the bf16 matmul would use."""
    from engine.flux.float8_compute import Float8CastLinear
    from engine.flux.streaming import CastLinear

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 128).to(BF16)
    with torch.no_grad():
        layer.weight.data = (torch.randn(128, 64) * 0.2).to(torch.float8_e4m3fn)
    layer.__class__ = CastLinear
    x = torch.randn(2, 9, 64, dtype=BF16)
    with torch.no_grad():
        bf16 = layer(x)
        layer.__class__ = Float8CastLinear
        got = layer(x)
        xq, scale = quantize_rows(x.reshape(-1, 64))
        want = (xq.float() * scale) @ layer.weight.float().T + layer.bias.float()
    assert got.dtype == BF16 and got.shape == (2, 9, 128)
    assert rel_error(got.reshape(-1, 128), want) < 0.005
    assert 0.005 < rel_error(got, bf16) < 0.05  # the activations' rounding, and only that


def test_quantize_rows_leaves_an_fp32_input_as_it_was():
    x = torch.randn(3, 32)
    before = x.clone()
    q, scale = quantize_rows(x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    torch.testing.assert_close(q.float() * scale, x, rtol=0.07, atol=1e-6)


def test_a_float8_cast_linear_given_fp32_takes_the_cast_matmul():
    """CUDA's row-scaled float8 kernel returns bf16 only: another input dtype casts instead."""
    from engine.flux.float8_compute import Float8CastLinear

    layer = torch.nn.Linear(32, 48)
    with torch.no_grad():
        layer.weight.data = (torch.randn(48, 32) * 0.2).to(torch.float8_e4m3fn)
    layer.__class__ = Float8CastLinear
    x = torch.randn(5, 32)
    with torch.no_grad():
        want = x @ layer.weight.float().T + layer.bias
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_float8_matmuls_budget_the_quantized_input_of_the_widest_layer():
    from engine.flux.residency import FLUX_LAYER_CAST_BYTES, layer_work_bytes

    assert layer_work_bytes(False, True, 1024 * 1024) == 0  # no layer_cast: a work buffer
    assert layer_work_bytes(True, False, 1024 * 1024) == FLUX_LAYER_CAST_BYTES
    # 4096 + 512 tokens of proj_out's 15360-wide input, fp32 and float8: 5 bytes a value
    assert layer_work_bytes(True, True, 1024 * 1024) == 4608 * 15360 * 5
    assert layer_work_bytes(True, True, 1024 * 1024, batch_images=2) == 2 * 4608 * 15360 * 5
    assert layer_work_bytes(True, True, 256 * 256) == FLUX_LAYER_CAST_BYTES  # the larger


@pytest.mark.parametrize("card", [15.5, 23.0])
def test_with_float8_matmuls_the_plan_keeps_no_bf16_copies_but_more_float8_blocks(card):
    """bf16 copies would take the bf16 matmul: with float8 matmuls their memory keeps float8
    blocks on the GPU instead (the bot's plan with its default limits)."""
    import dataclasses

    from engine.config import LimitsSection, ModelSection
    from engine.flux.presets import plan_memory
    from engine.flux.residency import (
        BF16,
        FLUX_FIXED_BYTES,
        FLUX_OTHER_WEIGHTS,
        FP8,
        STREAMED,
        dit_residency,
        flux_dev_block_sizes,
        layer_work_bytes,
    )

    placed = {}
    for float8 in (False, True):
        config = ModelSection(device="cuda", float8_compute=float8)
        plan = plan_memory(config, card - 0.5, max_images=LimitsSection().images_max)
        assert plan.streaming and plan.float8_matmul is float8
        others = dataclasses.replace(FLUX_OTHER_WEIGHTS, parked=plan.park_models)
        cast = layer_work_bytes(plan.layer_cast, plan.float8_matmul, plan.max_pixels,
                                plan.batch_images)
        placed[float8] = dit_residency(plan, flux_dev_block_sizes(), FLUX_FIXED_BYTES, others,
                                       cast).placements
    # without float8 these cards keep bf16 copies (2 and 33 blocks); with it every block is
    # a float8 block on the GPU, none streamed
    assert BF16 in placed[False] and STREAMED not in placed[False]
    assert set(placed[True]) == {FP8}


def test_the_plan_follows_float8_only_where_the_device_runs_it(tmp_path, monkeypatch):
    from engine.config import ModelSection
    from engine.flux import float8_compute
    from engine.flux.backend import FluxBackend

    backend = FluxBackend(ModelSection(models_dir=str(tmp_path), device="cuda",
                                       float8_compute=True))
    monkeypatch.setattr(float8_compute, "check_float8_matmul", lambda device: None)
    assert backend._planning_config().float8_compute
    monkeypatch.setattr(float8_compute, "check_float8_matmul",
                        lambda device: "an RTX 3060 has no float8 tensor cores")
    assert not backend._planning_config().float8_compute
    assert backend.config.float8_compute  # the user's setting stays, for the log to explain


def test_a_style_adds_its_branch_to_the_float8_matmuls():
    """With float8 compute on (the default), a LoRA style's hooks sit on ``Float8CastLinear``
    layers: each adds exactly alpha·B·A·x to the float8 product, the style changes the image,
    and after the job the DiT is exactly the plain float8 one again."""
    from engine.flux.float8_compute import Float8CastLinear, enable_float8_matmuls
    from engine.flux.lora import LoraBranches, LoraWeights, convert_lora, lora_targets
    from engine.flux.residency import FP8 as FP8_BLOCK
    from engine.flux.residency import STREAMED
    from tests.test_lora_styles import tiny_lora
    from tests.test_residency import make_inputs

    model, _, handle = streamed_tiny([STREAMED, FP8_BLOCK] * 3 + [STREAMED])
    enable_float8_matmuls(model)
    weights = LoraWeights(convert_lora(tiny_lora(8, "kohya", seed=1)))
    branches = LoraBranches.attach(model, set(weights.pairs))
    name = next(n for n, m in lora_targets(model).items()
                if type(m) is Float8CastLinear and n in weights.pairs)
    layer = lora_targets(model)[name]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    # registered after the style's hook, so it sees the styled output
    watch = layer.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    inputs = make_inputs(5)
    with torch.no_grad():
        plain = model(*inputs)
        with branches.active(weights, 0.8, "cpu"):
            styled = model(*inputs)
            x, out = seen[-1]
            # forward() alone is the float8 product without any hook; the style's own A and B
            # (from the file, in float32) give what the branch must add: 0.8·B·A·x
            a, b = weights.pairs[name]
            branch = (x.float() @ a.float().T) @ b.float().T * 0.8
            assert branch.abs().mean() > 0.01  # a branch large enough to see
            torch.testing.assert_close((out - layer.forward(x)).float(), branch,
                                       rtol=0.03, atol=0.03)
        after = model(*inputs)
    watch.remove()
    assert not torch.allclose(styled, plain, atol=1e-2)  # the style changes the output
    assert torch.equal(after, plain)  # cleared: the next job is the plain float8 model
    handle.close()


def test_auto_asks_for_float8_only_compiled_on_cuda_and_true_everywhere():
    from engine.config import ModelSection
    from engine.flux.presets import float8_wanted, planned_config

    auto = ModelSection()
    assert auto.float8_compute == "auto" and float8_wanted(auto)
    assert planned_config(auto, None) is auto  # the plan keeps no bf16 copies
    # eager or off CUDA: bf16 (no probe asked), planned as bf16
    for model in (ModelSection(compile=False), ModelSection(device="cpu")):
        assert not float8_wanted(model)
        assert planned_config(model, None).float8_compute is False
    # a GPU without float8 tensor cores: bf16
    assert planned_config(auto, "no float8 tensor cores").float8_compute is False
    # true: wherever the device runs them, eager or on the CPU too
    forced = ModelSection(float8_compute=True, compile=False, device="cpu")
    assert float8_wanted(forced) and planned_config(forced, None) is forced
    off = ModelSection(float8_compute=False)
    assert not float8_wanted(off) and planned_config(off, None) is off


def test_float8_runs_in_the_streamed_plan_and_in_max_only_when_asked():
    from engine.config import ModelSection
    from engine.flux.presets import float8_applies, plan_memory

    for free, preset in ((7.5, "low"), (23.0, "balanced")):
        plan = plan_memory(ModelSection(), free, 0.5)
        assert plan.preset == preset and plan.streaming and plan.float8_matmul
        assert float8_applies(plan, ModelSection())
        bf16 = ModelSection(float8_compute=False)
        assert not plan_memory(bf16, free, 0.5).float8_matmul and not float8_applies(plan, bf16)
    no_cast = ModelSection(layer_cast=False)
    assert not float8_applies(plan_memory(no_cast, 7.5, 0.5), no_cast)
    big = plan_memory(ModelSection(preset="max"), 70.0, 0.5)
    assert big.preset == "max"
    assert not float8_applies(big, ModelSection(preset="max"))  # auto keeps max in bf16
    assert float8_applies(big, ModelSection(preset="max", float8_compute=True))


def test_the_config_takes_auto_true_or_false():
    from engine.config import ConfigError, config_from_dict

    for value in ("auto", True, False):
        got = config_from_dict({"model": {"float8_compute": value}}).model.float8_compute
        assert got == value and type(got) is type(value)  # true stays a bool, not "True"
    with pytest.raises(ConfigError, match='float8_compute = \'on\' is not allowed: "auto", '
                                          'true or false'):
        config_from_dict({"model": {"float8_compute": "on"}})
    with pytest.raises(ConfigError, match="must be a string or true or false"):
        config_from_dict({"model": {"float8_compute": 1}})


def test_the_probe_answers_no_instead_of_raising(monkeypatch):
    """On by default, so a machine whose CUDA cannot answer (no driver, a CPU-only build)
    must get bf16, not a failed start."""
    from engine.flux import float8_compute

    def no_driver(device):
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_driver)
    assert "Found no NVIDIA driver" in float8_compute.check_float8_matmul("cuda")

    def cpu_only(device):
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(torch.cuda, "get_device_capability", cpu_only)
    assert "not compiled with CUDA" in float8_compute.check_float8_matmul("cuda:0")


def test_eager_blocks_under_auto_go_back_to_casting(caplog, monkeypatch):
    """A compiler failure leaves eager blocks, where float8's per-token scaling costs more than
    it saves: "auto" turns the float8 layers back into casting ones; true keeps them."""
    from engine.config import ModelSection
    from engine.flux.backend import FluxBackend
    from engine.flux.float8_compute import Float8CastLinear, enable_float8_matmuls
    from engine.flux.residency import STREAMED
    from engine.flux.streaming import CastLinear
    from tests.test_residency import make_inputs

    for setting, stays in (("auto", False), (True, True)):
        model, reference, handle = streamed_tiny([STREAMED] * 7)
        backend = FluxBackend(ModelSection(float8_compute=setting))
        backend.float8 = enable_float8_matmuls(model)
        monkeypatch.setattr(FluxBackend, "_stream", property(lambda self, h=handle: h))
        with caplog.at_level("WARNING"):
            backend._float8_off_when_eager()
        layer = model.blocks[0].attn.a_to_qkv
        assert (type(layer) is Float8CastLinear) is stays
        if not stays:
            assert type(layer) is CastLinear and backend.float8 is None
            assert "float8 matmuls off with the eager blocks" in caplog.text
            with torch.no_grad():  # exactly the casting layers' output again
                inputs = make_inputs(2)
                torch.testing.assert_close(model(*inputs), reference(*inputs), rtol=0, atol=0)
        handle.close()
