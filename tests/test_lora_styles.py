"""LoRA styles (issue 13 item 1) on the CPU: random LoRA files in the kohya and diffusers FLUX
layouts, converted by diffsynth and applied unfused to diffsynth's FLUX blocks (the tiny DiT of
``test_residency``) streamed in float8 as the ``low`` preset does; cleared after the job,
switched between jobs, never written into the float8 weights; the config, ``--style``, the
engine's refusal of an unknown style, the PNG parameters and the console on the dry-run path."""

from __future__ import annotations

import copy
import dataclasses
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth.models.flux_dit")

from bench.make_random_lora import lora_state_dict, write_lora  # noqa: E402
from engine.config import ConfigError, StyleSection, config_from_dict  # noqa: E402
from engine.errors import GenerationFailed, InvalidCommand  # noqa: E402
from engine.flux.device_budget import device_budget  # noqa: E402
from engine.flux.lora import (  # noqa: E402
    LoraBranches,
    LoraWeights,
    convert_lora,
    lora_targets,
    pad_ranks,
    read_lora,
)
from engine.flux.residency import FP8, STREAMED  # noqa: E402
from engine.flux.streaming import dit_blocks, enable_block_streaming  # noqa: E402
from engine.grammar import parse_command, parse_imagine  # noqa: E402
from engine.png import read_parameters  # noqa: E402
from engine.request import ImageRequest  # noqa: E402
from engine.styles import check_style, short_hash  # noqa: E402
from tests.test_residency import DIM, MIXED, TinyDiT, make_inputs, make_models, plan_for  # noqa: E402

N_DOUBLE, N_SINGLE = 3, 4  # TinyDiT's blocks


def tiny_lora(rank: int = 8, fmt: str = "diffusers", seed: int = 0, **kw) -> dict:
    return lora_state_dict(rank, fmt, dim=DIM, double=N_DOUBLE, single=N_SINGLE, std=0.2,
                           seed=seed, **kw)


def fused_reference(reference: torch.nn.Module, pairs: dict, alpha: float) -> torch.nn.Module:
    """The bf16 reference with W + alpha·B·A written into its weights (in float32)."""
    modules = lora_targets(reference)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            w = modules[name].weight
            w.copy_((w.float() + alpha * b.float() @ a.float()).to(w.dtype))
    return reference


# -- diffsynth's conversion of the real layouts ---
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_both_layouts_reach_every_linear_layer_of_every_block(fmt):
    pairs = convert_lora(tiny_lora(4, fmt))
    targets = lora_targets(TinyDiT())
    in_blocks = {n for n in targets if n.startswith(("blocks.", "single_blocks."))}
    assert set(pairs) == in_blocks  # 10 per double block, 3 per single block
    for name, (a, b) in pairs.items():
        assert a.shape[1] == targets[name].in_features and b.shape[0] == targets[name].out_features


def test_diffusers_q_k_v_become_the_fused_layer_with_the_same_update():
    sd = tiny_lora(4, "diffusers")
    a, b = convert_lora(sd)["blocks.1.attn.a_to_qkv"]
    prefix = "transformer.transformer_blocks.1.attn"
    want = torch.cat([sd[f"{prefix}.to_{p}.lora_B.weight"].float()
                      @ sd[f"{prefix}.to_{p}.lora_A.weight"].float() for p in "qkv"])
    torch.testing.assert_close(b.float() @ a.float(), want, rtol=2e-2, atol=2e-3)


def test_kohya_alpha_scales_the_update_by_alpha_over_rank():
    plain = convert_lora(tiny_lora(4, "kohya"))["single_blocks.2.proj_out"]
    scaled = convert_lora(tiny_lora(4, "kohya", alpha=2.0))["single_blocks.2.proj_out"]
    torch.testing.assert_close(scaled[1].float() @ scaled[0].float(),
                               0.5 * (plain[1].float() @ plain[0].float()), rtol=2e-2, atol=1e-3)


# -- the branch on one layer ---
def test_the_branch_adds_alpha_b_a_x_and_is_gone_after_the_job():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(32, 48)).to(torch.bfloat16)
    a, b = torch.randn(8, 32).bfloat16(), torch.randn(48, 8).bfloat16()
    x = torch.randn(5, 32).bfloat16()
    branches = LoraBranches.attach(layer, {"0"})
    with torch.no_grad():
        before = layer(x)
        with branches.active(LoraWeights({"0": (a, b)}), 0.7, "cpu"):
            got = layer(x)
            assert branches.active_bytes == (8 * 32 + 48 * 8) * 2
        after = layer(x)
    want = (x.float() @ layer[0].weight.float().T + layer[0].bias.float()
            + 0.7 * (x.float() @ a.float().T) @ b.float().T)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)
    assert torch.equal(before, after) and branches.active_bytes == 0


def test_an_error_in_the_job_still_clears_the_branch():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8))
    branches = LoraBranches.attach(layer)
    x = torch.randn(2, 8)
    before = layer(x)
    with pytest.raises(RuntimeError), branches.active(
            LoraWeights({"0": (torch.ones(2, 8), torch.ones(8, 2))}), 1.0, "cpu"):
        raise RuntimeError("out of memory in the middle of the job")
    assert torch.equal(layer(x), before)


# -- the streamed float8 DiT ---
def float8_bytes(handle) -> list[bytes]:
    return [b.source.view(torch.uint8).clone().numpy().tobytes() for b in handle._blocks
            if b.source is not None]


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_streamed_float8_blocks_with_a_style_equal_the_fused_reference(fmt, tmp_path):
    model, reference = make_models()
    handle = enable_block_streaming(model, plan_for(model, MIXED), "cpu")
    path = write_lora(tmp_path / "style.safetensors", 8, fmt, dim=DIM, double=N_DOUBLE,
                      single=N_SINGLE, std=0.2)
    weights = read_lora(str(path), lora_targets(model))
    assert len(weights.pairs) == 10 * N_DOUBLE + 3 * N_SINGLE and weights.ignored == 0
    branches = LoraBranches.attach(model, set(weights.pairs))
    fp8_before = float8_bytes(handle)
    inputs = make_inputs(3)
    with torch.no_grad():
        plain = model(*inputs)
        with branches.active(weights, 0.8, "cpu"):
            styled = model(*inputs)
        after = model(*inputs)
        # the same branch on the plain bf16 modules: the streamer changes nothing of it
        with LoraBranches.attach(reference).active(weights, 0.8, "cpu"):
            assert torch.equal(reference(*inputs), styled)
        # in float32 the branch is W·x + alpha·B·A·x: the fused weights' output
        ref32 = copy.deepcopy(reference).float()
        branches32 = LoraBranches.attach(ref32)
        branches32.apply(weights, 0.8, "cpu", dtype=torch.float32)
        unfused = ref32(*[t.float() if t.is_floating_point() else t for t in inputs])
        branches32.detach()
        fused = fused_reference(ref32, weights.pairs, 0.8)(
            *[t.float() if t.is_floating_point() else t for t in inputs])
    assert not torch.allclose(styled, plain, atol=1e-2)  # the style changes the output
    torch.testing.assert_close(unfused, fused, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, plain)  # cleared: the next job is exactly the plain model
    assert float8_bytes(handle) == fp8_before  # the float8 weights were never written
    handle.close()


def test_switching_styles_gives_the_second_style_alone():
    model, _ = make_models()
    enable_block_streaming(model, plan_for(model, [STREAMED] * 4 + [FP8] * 3), "cpu")
    targets = lora_targets(model)
    one = LoraWeights(convert_lora(tiny_lora(8, "kohya", seed=1)))
    two = LoraWeights(convert_lora(tiny_lora(16, "diffusers", seed=2)))
    assert set(one.pairs) <= set(targets)
    branches = LoraBranches.attach(model, set(one.pairs) | set(two.pairs))
    inputs = make_inputs(4)
    with torch.no_grad():
        with branches.active(two, 0.5, "cpu"):
            alone = model(*inputs)
        with branches.active(one, 1.0, "cpu"):
            first = model(*inputs)
        with branches.active(two, 0.5, "cpu"):
            second = model(*inputs)
    assert torch.equal(second, alone) and not torch.equal(first, second)


def test_compiled_blocks_follow_the_style_without_recompiling_per_switch():
    """The hooks stay; a style changes the tensors they read, which dynamo lifts as inputs
    (``backend="eager"``: dynamo's guards without a C compiler). Padded to the same ranks, styles
    of ranks 4, 8 and 16 use the graphs the first one made (unpadded each rank added graphs)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, _ = make_models()
    enable_block_streaming(model, plan_for(model, MIXED), "cpu")
    styles = [LoraWeights(convert_lora(tiny_lora(r, "kohya", seed=r))) for r in (4, 8, 16)]
    branches = LoraBranches.attach(model)
    inputs = make_inputs(5)
    with torch.no_grad():
        eager = [model(*inputs)]
        for w in styles:
            with branches.active(w, 1.0, "cpu"):
                eager.append(model(*inputs))
        compiled = {}
        for block in dit_blocks(model):
            kind = type(block)
            compiled.setdefault(kind, torch.compile(kind.forward, backend="eager"))
            block.forward = types.MethodType(compiled[kind], block)
        branches.pad_ranks = pad_ranks(styles)
        got = [model(*inputs)]
        graphs = []
        for w in styles:
            with branches.active(w, 1.0, "cpu"):
                got.append(model(*inputs))
            graphs.append(counters["stats"]["unique_graphs"])
        got.append(model(*inputs))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs == [graphs[0]] * 4  # no style after the first compiled
    for g, e in zip(got, [*eager, eager[0]], strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


# -- the backend around a fake pipeline ---
def style_backend(tmp_path: Path, monkeypatch):
    from tests.test_flux_builder import FakePipe, cpu_backend

    class PipeWithDit(FakePipe):
        def __init__(self, plan, paths) -> None:
            super().__init__(plan, paths)
            _, self.dit = make_models()  # the bf16 modules (max); streaming is tested above
            self.outputs = []

        def __call__(self, **kwargs):
            with torch.no_grad():
                self.outputs.append(self.dit(*make_inputs(6)))
            return super().__call__(**kwargs)

    write_lora(tmp_path / "ink.safetensors", 8, "kohya", dim=DIM, double=N_DOUBLE,
               single=N_SINGLE, std=0.2)
    backend, built = cpu_backend(tmp_path, PipeWithDit)
    backend.styles = {"ink": StyleSection(file=str(tmp_path / "ink.safetensors"), alpha=0.9,
                                          trigger="ink drawing")}
    return backend, built


def test_the_backend_applies_the_style_for_its_job_only(tmp_path, monkeypatch):
    backend, built = style_backend(tmp_path, monkeypatch)
    backend.load()
    request = ImageRequest(prompt="a fox", seed=1, steps=2, width=256, height=256, guidance=3.5)
    backend.generate(request, lambda i, n: None)
    backend.generate(request.with_changes(style="ink"), lambda i, n: None)
    backend.generate(request, lambda i, n: None)
    pipe = built[0]
    plain, styled, again = pipe.outputs
    assert torch.equal(plain, again) and not torch.equal(plain, styled)
    assert [c["prompt"] for c in pipe.calls] == ["a fox", "ink drawing, a fox", "a fox"]
    with pytest.raises(GenerationFailed, match="no longer set up"):
        backend.generate(request.with_changes(style="gone"), lambda i, n: None)
    backend.close()
    assert not any(m._forward_hooks for m in pipe.dit.modules())  # hooks gone with the pipeline


def warmed_with_styles(tmp_path: Path, monkeypatch, max_pixels: int = 1024 * 1024):
    """A max backend with three styles: ranks 4 and 8 on every layer, and rank 4 on the
    attention layers only ("attn"); compiled as on CUDA (the fake pipe never runs the blocks;
    the LoRA copies stay on the CPU) and warmed up once; (backend, pipe)."""
    from safetensors.torch import save_file

    from tests.test_flux_builder import FakePipe, cpu_backend

    class Pipe(FakePipe):
        def __init__(self, plan, paths) -> None:
            super().__init__(plan, paths)
            _, self.dit = make_models()
            self.ranks: list[tuple[int, int]] = []  # (attention, feed-forward) branch ranks

        def __call__(self, **kwargs):
            block = self.dit.blocks[0]
            self.ranks.append(tuple(_branch_rank(layer) for layer in (block.attn.a_to_qkv,
                                                                          block.ff_a[0])))
            return super().__call__(**kwargs)

    for name, rank in (("ink", 4), ("wash", 8)):
        write_lora(tmp_path / f"{name}.safetensors", rank, "kohya", dim=DIM, double=N_DOUBLE,
                   single=N_SINGLE, std=0.2)
    every = tiny_lora(4, "kohya", seed=3)
    save_file({k: v for k, v in every.items() if "attn" in k}, str(tmp_path / "attn.safetensors"))
    backend, built = cpu_backend(tmp_path, Pipe, preset="max")
    backend.max_pixels = max_pixels
    backend.styles = {name: StyleSection(file=str(tmp_path / f"{name}.safetensors"),
                                         trigger=name) for name in ("ink", "wash", "attn")}
    backend.load()  # on the CPU: not compiled, so the warm-up (if any) ran without styles
    pipe = built[0]
    assert all(ranks == (0, 0) for ranks in pipe.ranks)
    backend.plan = dataclasses.replace(backend.plan, device="cuda")  # as compiling_backend does
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    apply = backend._branches.apply
    monkeypatch.setattr(backend._branches, "apply", lambda w, alpha, device: apply(w, alpha, "cpu"))
    backend._compile()
    pipe.calls.clear()
    pipe.ranks.clear()
    assert backend._try_warm_up() is False
    assert backend._branches.active_bytes == 0  # no style left on after the warm-up
    return backend, pipe


def _branch_rank(layer: torch.nn.Module) -> int:
    """The rank of the LoRA branch the layer's hook adds now (0: none)."""
    slot = next(iter(layer._forward_hooks.values())).__self__
    return 0 if slot.a is None else slot.a.shape[0]


def test_a_compiled_warm_up_runs_its_passes_again_with_a_style_of_each_set_of_layers(
        tmp_path, monkeypatch):
    """A block with a LoRA branch is a graph of its own (dynamo specialises on the branch's
    shapes): every style is padded to each layer's largest rank, so the warm-up needs one style
    per set of layers reached (all: "ink" and "wash"; attention only: "attn"), not one per rank, and
    no user's first styled job compiles."""
    backend, pipe = warmed_with_styles(tmp_path, monkeypatch)
    sizes = [(c["width"], c["prompt"]) for c in pipe.calls]
    assert sizes == [(1024, "warm-up"), (512, "warm-up"), (512, "warm-up"),
                     (1024, "ink, warm-up"), (512, "attn, warm-up"), (512, "ink, warm-up")]
    assert pipe.ranks == [(0, 0)] * 3 + [(8, 8), (8, 0), (8, 8)]  # padded to wash's 8


def test_a_warm_up_of_one_pass_still_runs_a_style_of_each_set_of_layers(tmp_path, monkeypatch):
    """limits.max_pixels = 512²: one pass only, but both sets of layers still get their graphs."""
    backend, pipe = warmed_with_styles(tmp_path, monkeypatch, max_pixels=512 * 512)
    assert [c["prompt"] for c in pipe.calls] == ["warm-up", "ink, warm-up", "attn, warm-up"]


def test_styles_padded_to_each_layers_largest_rank_add_the_same_branches():
    """diffusers files give diffsynth's fused layers a larger rank than the others: each layer
    is padded to its own largest rank among the styles, so a small style takes the large one's
    shapes (what the compiled graphs see) and adds exactly what it added unpadded; one style
    alone is not padded at all."""
    _, model = make_models()  # the bf16 modules
    small = LoraWeights(convert_lora(tiny_lora(4, "diffusers", seed=2)))
    large = LoraWeights(convert_lora(tiny_lora(8, "diffusers", seed=3)))
    ranks = pad_ranks([small, large])
    assert ranks == {name: a.shape[0] for name, (a, _) in large.pairs.items()}
    assert len(set(ranks.values())) > 1  # fused layers: a larger rank than the rest
    assert small.nbytes_at(ranks) == large.nbytes
    assert small.nbytes_at(pad_ranks([small])) == small.nbytes
    branches = LoraBranches.attach(model, set(ranks))
    inputs = make_inputs(5)
    with torch.no_grad():
        with branches.active(small, 0.7, "cpu"):
            plain = model(*inputs)
        branches.pad_ranks = ranks
        with branches.active(small, 0.7, "cpu"):
            assert {n: slot.a.shape[0] for n, slot in branches.slots.items()} == ranks
            padded = model(*inputs)
    torch.testing.assert_close(padded, plain, rtol=0, atol=0)


def test_a_style_that_fails_half_way_on_is_taken_off_entirely(monkeypatch):
    """Running out of GPU memory while a style's matrices are copied leaves no layer styled."""
    import engine.flux.lora as lora

    _, model = make_models()
    weights = LoraWeights(convert_lora(tiny_lora(4, "kohya", seed=2)))
    branches = LoraBranches.attach(model)
    copies = []

    def copy_or_fail(*args, **kwargs):
        if len(copies) == 2:
            raise torch.cuda.OutOfMemoryError("out of memory")
        copies.append(1)
        return real(*args, **kwargs)

    real = lora._padded
    monkeypatch.setattr(lora, "_padded", copy_or_fail)
    with pytest.raises(torch.cuda.OutOfMemoryError), branches.active(weights, 1.0, "cpu"):
        pass
    assert branches.active_bytes == 0
    assert all(slot.a is None and slot.b is None for slot in branches.slots.values())


def test_the_memory_plan_sets_the_largest_style_aside():
    plain = device_budget(8.0, None)
    styled = device_budget(8.0, None, lora_gib=0.6)
    assert styled.allocator_gib == pytest.approx(plain.allocator_gib - 0.6)
    assert "LoRA styles 0.60" in styled.describe()


# -- config, grammar, engine, PNG, console (dry-run) ---
def test_style_tables_are_validated_with_clear_messages():
    ok = config_from_dict({"styles": {"ink": {"file": "a.safetensors", "alpha": 0.7}}})
    assert ok.styles["ink"].alpha == 0.7 and ok.styles["ink"].trigger == ""
    for bad, said in [({"Ink!": {"file": "a.safetensors"}}, "style names are"),
                      ({"ink": {"file": "a.ckpt"}}, "styles.ink.file"),
                      ({"ink": {"file": "a.safetensors", "alpha": 0}}, "styles.ink.alpha"),
                      ({"ink": {"file": "a.safetensors", "model_id": "nope"}}, "model_id"),
                      ({"ink": {"file": "a.safetensors", "colour": 1}}, "unknown setting")]:
        with pytest.raises(ConfigError, match=said):
            config_from_dict({"styles": bad})


def test_style_flag_parses_and_unknown_styles_are_refused_politely():
    from engine.config import LimitsSection

    limits = LimitsSection()
    assert parse_imagine("a fox --style Ink", limits).style == "ink"
    assert parse_command("a fox", limits).merged_with(limits, style="ink")[0].style == "ink"
    with pytest.raises(InvalidCommand, match="--style needs the name of a style"):
        parse_imagine("a fox --style ???", limits)
    styles = {"ink": StyleSection(file="a.safetensors"), "oil": StyleSection(file="b.safetensors")}
    check_style("ink", styles)
    with pytest.raises(InvalidCommand, match="the styles are: ink, oil"):
        check_style("pastel", styles)
    with pytest.raises(InvalidCommand, match="no styles set up"):
        check_style("ink", {})
    old_row = ImageRequest(prompt="p", seed=1, steps=1, width=256, height=256, guidance=3.5)
    assert ImageRequest.from_json(old_row.to_json().replace(', "style": ""', "")).style == ""


async def test_console_style_is_queued_recorded_in_the_png_and_unknown_ones_are_not(
        engine_factory, config, tmp_path):
    import io

    from bot.console import ConsoleAdapter

    lora = write_lora(tmp_path / "ink.safetensors", 4, "kohya", dim=DIM, double=1, single=1)
    config.styles = {"ink": StyleSection(file=str(lora), alpha=0.8, description="ink")}
    engine = await engine_factory()
    out = io.StringIO()
    adapter = ConsoleAdapter(engine, stdin=io.StringIO(), stdout=out)
    with pytest.raises(InvalidCommand, match="the styles are: ink"):
        await adapter.imagine("/imagine a fox --style pastel")
    assert engine.queued_count() == 0
    await adapter.handle_line("/styles")
    assert "ink" in out.getvalue() and "--style ink" in out.getvalue()
    job = await adapter.imagine("a fox --style ink --seed 3")
    result = await job.result()
    fields = read_parameters(result.images[0].png)
    assert fields["prompt"] == "a fox <lora:ink:0.8>"
    assert fields["Lora hashes"] == f'"ink: {short_hash(str(lora))}"'
    assert job.request.style == "ink"
