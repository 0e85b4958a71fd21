"""The FLUX pipeline builder, checked without loading a weight: for each memory preset, the
ModelConfigs and vram_limit handed to diffsynth; the model files; the backend around a fake
pipeline."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")

from PIL import Image  # noqa: E402

from engine.backends import ModelState  # noqa: E402
from engine.config import ModelSection  # noqa: E402
from engine.flux import pipeline as fp  # noqa: E402
from engine.flux.backend import FluxBackend  # noqa: E402
from engine.flux.device_budget import (  # noqa: E402
    FRAGMENTATION_FRACTION,
    FRAGMENTATION_GIB,
    RUNTIME_RESERVE_GIB,
)
from engine.flux.model_files import (  # noqa: E402
    ModelFilesMissing,
    ModelPaths,
    describe_model_files,
    ensure_model_files,
)
from engine.flux.presets import STREAM_MIN_GIB, make_plan, plan_memory, tighter  # noqa: E402
from engine.request import ImageRequest  # noqa: E402

FP8, BF16 = torch.float8_e4m3fn, torch.bfloat16
PATHS = ModelPaths(dit="m/dit.safetensors", text_encoder="m/te.safetensors",
                   text_encoder_2=["m/t5-1.safetensors", "m/t5-2.safetensors"],
                   vae="m/ae.safetensors", tokenizer="m/tok", tokenizer_2="m/tok2")
# diffsynth's own low-VRAM FLUX example (examples/flux/model_inference_low_vram/FLUX.1-dev.py)
EXAMPLE_VRAM_CONFIG = {
    "offload_dtype": FP8, "offload_device": "cpu", "onload_dtype": FP8, "onload_device": "cpu",
    "preparing_dtype": FP8, "preparing_device": "cuda", "computation_dtype": BF16,
    "computation_device": "cuda",
}
STREAMED_BF16 = {k: (BF16 if k.endswith("dtype") else v) for k, v in EXAMPLE_VRAM_CONFIG.items()}
RESIDENT_FP8 = {**EXAMPLE_VRAM_CONFIG, "offload_device": "cuda", "onload_device": "cuda"}


def configs_for(preset: str, free: float = 11.5, used: float = 0.5, **model):
    plan = plan_memory(ModelSection(preset=preset, **model), free, used)
    kwargs = fp.pipeline_kwargs(plan, PATHS)
    names = ("dit", "clip", "t5", "vae")
    return plan, kwargs, dict(zip(names, kwargs["model_configs"], strict=True))


def managed(config) -> bool:
    """diffsynth's own test for 'enable VRAM management' on what it would fill in."""
    from diffsynth.models.model_loader import ModelPool

    return ModelPool().need_to_enable_vram_management(config.vram_config())


def test_low_preset_without_streaming_is_the_seeds_set_up() -> None:
    plan, kwargs, cfg = configs_for("low", free=11.5, used=0.5, dit_streaming=False)
    assert cfg["dit"].vram_config() == EXAMPLE_VRAM_CONFIG
    for name in ("clip", "t5", "vae"):
        assert cfg[name].vram_config() == STREAMED_BF16, name
    assert all(managed(c) for c in cfg.values())
    # diffsynth compares the whole device's use: what was used at start (0.5 GiB) + the
    # allocator's share of the device budget - 0.5 GiB kept free for activations
    assert kwargs["vram_limit"] == pytest.approx(0.5 + plan.budget_gib - 0.5)
    assert plan.budget_gib == plan.device_budget.allocator_gib < 11.5
    assert kwargs["torch_dtype"] is BF16 and kwargs["device"] == "cuda"


def test_balanced_without_streaming_keeps_the_float8_dit_resident_and_streams_t5() -> None:
    plan, kwargs, cfg = configs_for("balanced", free=22.0, used=1.0, dit_streaming=False)
    assert cfg["dit"].vram_config() == RESIDENT_FP8
    assert cfg["t5"].vram_config() == STREAMED_BF16
    for name in ("clip", "vae"):
        assert not managed(cfg[name])
        assert (cfg[name].computation_device, cfg[name].computation_dtype) == ("cuda", BF16)
    assert kwargs["vram_limit"] == pytest.approx(1.0 + plan.budget_gib - 0.5)


def test_low_with_streaming_loads_the_dit_on_the_cpu_in_float8_unmanaged() -> None:
    plan, kwargs, cfg = configs_for("low", free=11.5, used=0.5)
    assert plan.streaming and "block streaming" in plan.describe()
    assert not managed(cfg["dit"])  # the streamer, not diffsynth, places it after loading
    assert (cfg["dit"].computation_device, cfg["dit"].computation_dtype) == ("cpu", FP8)
    # T5 is loaded like the DiT (float8 on the CPU, half the RAM) and block-streamed too;
    # CLIP and the VAE stay resident in bf16, outside diffsynth's greedy VRAM management
    assert plan.stream_t5 and not managed(cfg["t5"])
    assert (cfg["t5"].computation_device, cfg["t5"].computation_dtype) == ("cpu", FP8)
    for name in ("clip", "vae"):
        assert not managed(cfg[name])
        assert (cfg[name].computation_device, cfg[name].computation_dtype) == ("cuda", BF16)
    assert kwargs["vram_limit"] == pytest.approx(plan.budget_gib)


def test_balanced_with_streaming_keeps_clip_and_vae_resident_and_streams_t5_itself() -> None:
    plan, _, cfg = configs_for("balanced", free=22.0, used=1.0)
    assert plan.streaming and plan.stream_t5
    assert not managed(cfg["dit"]) and not managed(cfg["t5"])
    assert (cfg["t5"].computation_device, cfg["t5"].computation_dtype) == ("cpu", FP8)
    for name in ("clip", "vae"):
        assert not managed(cfg[name]) and cfg[name].computation_device == "cuda"


def test_streaming_tightens_by_tiling_then_shrinking_the_budget() -> None:
    plan = plan_memory(ModelSection(preset="max"), 40.0, 0.5)
    assert plan.stream_dit and not plan.streaming  # max keeps everything resident
    seen = [plan]
    while (nxt := tighter(seen[-1])) is not None:
        seen.append(nxt)
        assert len(seen) < 30
    assert [p.preset for p in seen[:3]] == ["max", "balanced", "low"]
    assert all(p.streaming for p in seen[1:])
    assert seen[3].vae_tiled and seen[3].budget_gib == seen[0].budget_gib
    budgets = [p.budget_gib for p in seen[3:]]
    assert budgets == sorted(budgets, reverse=True)
    assert budgets[-1] >= STREAM_MIN_GIB > budgets[-1] * 0.75


def test_streaming_is_never_planned_without_cuda() -> None:
    plan = plan_memory(ModelSection(preset="low", device="cpu"), None, 0.0)
    assert not plan.streaming


def test_max_loads_everything_resident_without_vram_management() -> None:
    plan, kwargs, cfg = configs_for("max", free=70.0)
    for config in cfg.values():
        assert not managed(config)
        assert config.offload_device is None and config.offload_dtype is None
        assert (config.computation_device, config.computation_dtype) == ("cuda", BF16)
    assert kwargs["vram_limit"] is None


@pytest.mark.parametrize(("free", "expected"), [(5.5, "low"), (11.0, "low"), (18.0, "low"),
                                                (20.0, "balanced"), (30.0, "balanced"),
                                                (36.5, "balanced"), (40.0, "max"),
                                                (78.0, "max")])
def test_auto_picks_from_the_free_memory(free: float, expected: str) -> None:
    """The thresholds apply to the allocator budget: the free memory less the context,
    kernels and a fragmentation margin."""
    assert configs_for("auto", free=free)[0].preset == expected


def test_vram_limit_gib_overrides_the_free_memory() -> None:
    plan, kwargs, _ = configs_for("auto", free=78.0, used=0.5, vram_limit_gib=8.0,
                                  dit_streaming=False)
    assert plan.preset == "low" and plan.device_budget.device_gib == 8.0
    runtime = RUNTIME_RESERVE_GIB
    margin = FRAGMENTATION_GIB + FRAGMENTATION_FRACTION * (8.0 - 0.5 - runtime)
    assert plan.budget_gib == pytest.approx(8.0 - 0.5 - runtime - margin)
    assert kwargs["vram_limit"] == pytest.approx(plan.budget_gib)


def test_configs_point_at_local_files_and_never_download() -> None:
    _, kwargs, cfg = configs_for("low")
    assert [c.path for c in kwargs["model_configs"]] == [
        PATHS.dit, PATHS.text_encoder, PATHS.text_encoder_2, PATHS.vae]
    for config in [*kwargs["model_configs"], kwargs["tokenizer_1_config"],
                   kwargs["tokenizer_2_config"]]:
        assert config.require_downloading() is False
    assert kwargs["tokenizer_1_config"].path == PATHS.tokenizer
    assert kwargs["tokenizer_2_config"].path == PATHS.tokenizer_2


def test_tighter_plans_only_shrink_and_end() -> None:
    plan = make_plan("max", "cuda", 40.0, used_gib=0.5)
    seen = [plan]
    while (nxt := tighter(seen[-1])) is not None:
        seen.append(nxt)
        assert len(seen) < 20
    assert [p.preset for p in seen[:3]] == ["max", "balanced", "low"]
    lows = [p.vram_limit_gib for p in seen[2:]]
    assert lows == sorted(lows, reverse=True) and lows[-1] == 0.0
    assert seen[-1].vae_tiled and tighter(seen[-1]) is None
    assert seen[1].vram_limit_gib == pytest.approx(40.0)  # budget kept through the ladder


def test_cpu_only_torch_survives_diffsynths_empty_cache() -> None:
    from diffsynth.pipelines.flux_image import FluxImagePipeline

    pipe = FluxImagePipeline(device="cpu", torch_dtype=BF16)
    pipe.vram_management_enabled = True
    pipe.load_models_to_device([])  # calls torch.cpu.empty_cache(), missing on CPU-only builds


def test_step_reporter_counts_each_finished_step_and_lets_aborts_through() -> None:
    calls: list[tuple[int, int]] = []
    seen = []
    for t in fp.step_reporter(lambda i, n: calls.append((i, n)))(["a", "b", "c"]):
        assert len(calls) == len(seen)  # a step is reported only once its body has run
        seen.append(t)
    assert calls == [(1, 3), (2, 3), (3, 3)]

    def abort(i: int, n: int) -> None:
        if i == 2:
            raise KeyboardInterrupt("cancelled")

    ran = []
    with pytest.raises(KeyboardInterrupt):
        for t in fp.step_reporter(abort)(range(5)):
            ran.append(t)
    assert ran == [0, 1]


# -- model files -------------------------------------------------------------------------------
def fill(root: Path, config: ModelSection) -> None:
    """Lay out tiny stand-ins for every file, as a finished download leaves them."""
    flux = root / config.flux_model_id
    for rel in ("text_encoder/model.safetensors", "ae.safetensors",
                "text_encoder_2/model-00001-of-00002.safetensors",
                "text_encoder_2/model-00002-of-00002.safetensors",
                "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/tokenizer.json"):
        (flux / rel).parent.mkdir(parents=True, exist_ok=True)
        (flux / rel).write_bytes(b"x" * 10)
    dit = root / config.dit_model_id / config.dit_file
    dit.parent.mkdir(parents=True, exist_ok=True)
    dit.write_bytes(b"y" * 100)


def test_describe_model_files_on_an_empty_folder(tmp_path: Path) -> None:
    rows = describe_model_files(ModelSection(models_dir=str(tmp_path)))
    assert [r.name for r in rows] == ["dit", "text_encoder", "text_encoder_2", "vae", "tokenizer",
                                      "tokenizer_2"]
    assert all(not r.present and r.will_download and r.size_bytes is None for r in rows)
    assert rows[0].path == str(tmp_path / "MAILAND/majicflus_v1/majicflus_v134.safetensors")
    offline = describe_model_files(ModelSection(models_dir=str(tmp_path), offline=True))
    assert not any(r.will_download for r in offline)


def test_describe_model_files_sizes_and_local_paths(tmp_path: Path) -> None:
    config = ModelSection(models_dir=str(tmp_path / "models"), vae_path=str(tmp_path / "my-ae.st"))
    fill(tmp_path / "models", config)
    rows = {r.name: r for r in describe_model_files(config)}
    assert rows["dit"].present and rows["dit"].size_bytes == 100
    assert rows["text_encoder_2"].present and rows["text_encoder_2"].size_bytes == 20
    assert not rows["vae"].present and not rows["vae"].will_download  # local paths never download
    assert "model.vae_path" in rows["vae"].source


def test_a_missing_t5_shard_is_not_present(tmp_path: Path) -> None:
    config = ModelSection(models_dir=str(tmp_path))
    fill(tmp_path, config)
    (tmp_path / config.flux_model_id / "text_encoder_2/model-00002-of-00002.safetensors").unlink()
    rows = {r.name: r for r in describe_model_files(config)}
    assert not rows["text_encoder_2"].present and rows["text_encoder_2"].will_download


def test_offline_names_the_missing_file_and_where_it_belongs(tmp_path: Path) -> None:
    config = ModelSection(models_dir=str(tmp_path), offline=True)
    fill(tmp_path, config)
    (tmp_path / config.flux_model_id / "ae.safetensors").unlink()

    def no_download(*args: object) -> None:
        raise AssertionError("offline mode downloaded")

    with pytest.raises(ModelFilesMissing) as err:
        ensure_model_files(config, no_download)
    message = str(err.value)
    assert "vae" in message and str(tmp_path / config.flux_model_id / "ae.safetensors") in message
    assert "offline" in message and "dit" not in message


def test_download_fetches_only_what_is_missing_per_repository(tmp_path: Path) -> None:
    config = ModelSection(models_dir=str(tmp_path))
    calls: list[tuple[str, Path, list[str]]] = []

    def fake_download(model_id: str, target: Path, patterns: list[str]) -> None:
        calls.append((model_id, target, patterns))
        fill(tmp_path, config)

    paths = ensure_model_files(config, fake_download)
    assert calls[0] == ("MAILAND/majicflus_v1", tmp_path / "MAILAND/majicflus_v1",
                        ["majicflus_v134.safetensors"])
    assert calls[1][0] == "black-forest-labs/FLUX.1-dev" and "text_encoder_2/*" in calls[1][2]
    assert len(calls) == 2
    assert [Path(p).name for p in paths.text_encoder_2] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert ensure_model_files(config, fake_download) == paths and len(calls) == 2  # nothing again


def test_a_failed_download_names_the_model_how_far_it_got_and_the_fix(tmp_path: Path) -> None:
    """Issue 15 row 5: a failed download ended with a bare `[E1020] Connection failed`."""
    config = ModelSection(models_dir=str(tmp_path))

    def cut_off(model_id: str, target: Path, patterns: list[str]) -> None:
        target.mkdir(parents=True, exist_ok=True)
        (target / "majicflus_v134.safetensors.part").write_bytes(b"x" * 2_000_000)
        raise ConnectionError("[E1020] Connection failed: timed out")

    with pytest.raises(ModelFilesMissing) as failed:
        ensure_model_files(config, cut_off)
    text = str(failed.value)
    assert "Downloading MAILAND/majicflus_v1 (majicflus_v134.safetensors)" in text
    assert "[E1020] Connection failed" in text and "0.0 GB of it is in" in text
    assert "the download resumes where it stopped" in text


def test_a_download_that_leaves_files_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesMissing, match="dit: expected at"):
        ensure_model_files(ModelSection(models_dir=str(tmp_path)), lambda *a: None)


def test_a_local_t5_folder_with_an_index_needs_its_shards(tmp_path: Path) -> None:
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}))
    (folder / "one.safetensors").write_bytes(b"1")
    config = ModelSection(models_dir=str(tmp_path / "m"), text_encoder_2_path=str(folder))
    assert not {r.name: r for r in describe_model_files(config)}["text_encoder_2"].present
    (folder / "two.safetensors").write_bytes(b"2")
    assert {r.name: r for r in describe_model_files(config)}["text_encoder_2"].present


# -- the backend around a fake pipeline -----------------------------------------------------------
class FakeDecoder(torch.nn.Module):
    def forward(self, sample, *args, **kwargs):
        return sample * 2


class FakePipe:
    """Speaks the part of diffsynth's FluxImagePipeline the backend relies on, batch semantics
    included: noise of batch 1 from ``generate_noise``, the prompt's embedding of batch 1 that
    the DiT (``model_fn``) must see at the latents' batch, the decode through ``vae_decoder``
    and ``vae_output_to_image``, which like diffsynth's averages over the batch."""

    vram_management_enabled = False

    def __init__(self, plan, paths) -> None:
        self.plan, self.paths, self.calls = plan, paths, []
        self.vae_decoder = FakeDecoder()
        self.model_fn = self.dit_step
        self.batches: list[int] = []

    def generate_noise(self, shape, seed=None, rand_device="cpu", **kwargs):
        return torch.randn(shape, generator=torch.Generator(rand_device).manual_seed(seed))

    def dit_step(self, latents, prompt_emb, **kwargs):
        assert prompt_emb.shape[0] == latents.shape[0]  # the DiT concatenates them
        self.batches.append(latents.shape[0])
        return latents * 0.1

    def vae_output_to_image(self, output):
        mean = output.mean(dim=0)  # "B C H W -> H W C", reduction="mean", as diffsynth does
        shade = int(abs(float(mean.mean())) * 10_000) % 256
        return Image.new("RGB", (mean.shape[-1] * 8, mean.shape[-2] * 8), (shade, 0, 0))

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        height, width = kwargs["height"], kwargs["width"]
        latents = self.generate_noise((1, 4, height // 8, width // 8), seed=kwargs["seed"],
                                      rand_device=kwargs["rand_device"])
        prompt = torch.zeros(1, 8)
        for _ in kwargs["progress_bar_cmd"](range(kwargs["num_inference_steps"])):
            latents = latents - self.model_fn(latents=latents, prompt_emb=prompt)
        return self.vae_output_to_image(self.vae_decoder(latents))


def cpu_backend(tmp_path: Path, pipe_class: type[FakePipe] | None = None, max_images: int = 4,
                **model) -> tuple[FluxBackend, list[FakePipe]]:
    config = ModelSection(models_dir=str(tmp_path), device="cpu", **model)
    fill(tmp_path, config)
    built: list[FakePipe] = []

    def factory(plan, paths):
        built.append((pipe_class or FakePipe)(plan, paths))
        return built[-1]

    return FluxBackend(config, pipeline_factory=factory, max_images=max_images), built


def test_backend_generates_with_the_requests_parameters(tmp_path: Path) -> None:
    backend, built = cpu_backend(tmp_path)
    assert backend.model_name == "majicflus_v134 (FLUX.1-dev)"
    backend.load()
    steps: list[tuple[int, int]] = []
    request = ImageRequest(prompt="a red fox", seed=7, steps=4, width=768, height=512, guidance=2.5)
    [image] = backend.generate(request, lambda i, n: steps.append((i, n)))
    assert image.size == (768, 512) and steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    call = built[0].calls[0]
    assert (call["prompt"], call["seed"], call["num_inference_steps"]) == ("a red fox", 7, 4)
    assert (call["height"], call["width"], call["embedded_guidance"]) == (512, 768, 2.5)
    assert call["cfg_scale"] == 1.0 and call["rand_device"] == "cpu"
    assert "input_image" not in call
    assert built[0].paths.dit.endswith("majicflus_v134.safetensors")
    assert backend.memory_info() == {}  # no CUDA device in use


def test_backend_makes_n_images_from_consecutive_seeds_with_one_progress(tmp_path: Path) -> None:
    """Three images: one pass, and each image is exactly the one its seed makes alone."""
    backend, built = cpu_backend(tmp_path)
    backend.load()
    steps: list[tuple[int, int]] = []
    request = ImageRequest(prompt="fox", seed=5, steps=2, width=512, height=512, guidance=3.5,
                           count=3)
    images = backend.generate(request, lambda i, n: steps.append((i, n)))
    pipe = built[0]
    assert len(pipe.calls) == 1 and pipe.batches == [3, 3]
    assert steps == [(3, 6), (6, 6)]
    alone = [backend.generate(request.one(i), lambda i, n: None)[0] for i in range(3)]
    assert pipe.batches[2:] == [1] * 6
    assert [im.getpixel((0, 0)) for im in images] == [im.getpixel((0, 0)) for im in alone]
    assert len({im.getpixel((0, 0)) for im in images}) == 3  # three seeds, three images
    # the pipeline is itself again: diffsynth's own noise, DiT call and decode
    assert pipe.model_fn == pipe.dit_step and "forward" not in pipe.vae_decoder.__dict__
    assert "vae_output_to_image" not in pipe.__dict__


@pytest.mark.parametrize(("max_images", "passes"), [(1, [1, 1, 1, 1]), (2, [2, 2]), (3, [3, 1]),
                                                    (4, [4])])
def test_a_job_larger_than_the_plans_pass_runs_in_passes(tmp_path: Path, max_images,
                                                         passes) -> None:
    """A pass holds ``limits.images_max`` images (the plan keeps room for that many waiting
    in each block); a job of more, which only a smaller limit than the job's makes, runs in
    several."""
    backend, built = cpu_backend(tmp_path, max_images=max_images)
    backend.load()
    steps: list[tuple[int, int]] = []
    request = ImageRequest(prompt="fox", seed=1, steps=1, width=1024, height=1024, guidance=3.5,
                           count=4)
    images = backend.generate(request, lambda i, n: steps.append((i, n)))
    assert len(images) == 4 and built[0].batches == passes
    assert [c["seed"] for c in built[0].calls] == [1 + sum(passes[:i]) for i in range(len(passes))]
    assert [i for i, _ in steps] == [sum(passes[:i + 1]) for i in range(len(passes))]
    assert all(n == 4 for _, n in steps)


def test_a_failed_batch_leaves_the_pipeline_as_it_was(tmp_path: Path) -> None:
    from engine.flux.batch import batched

    pipe = FakePipe(None, None)
    with pytest.raises(RuntimeError, match="out of memory"), batched(pipe, [1, 2]):
        assert pipe.generate_noise((1, 4, 2, 2), seed=9).shape[0] == 2
        raise RuntimeError("CUDA out of memory")
    assert pipe.model_fn == pipe.dit_step and pipe.generate_noise((1, 4, 2, 2), 9).shape[0] == 1
    assert "forward" not in pipe.vae_decoder.__dict__ and "vae_output_to_image" not in pipe.__dict__


def test_image_to_image_goes_through_diffsynths_input_image_and_strength(tmp_path: Path) -> None:
    backend, built = cpu_backend(tmp_path)
    backend.load()
    start = tmp_path / "start.png"
    Image.new("RGBA", (300, 200), (10, 200, 30, 128)).save(start)
    request = ImageRequest(prompt="fox", seed=5, steps=20, width=512, height=512, guidance=3.5,
                           init_image=str(start), strength=0.35)
    steps: list[tuple[int, int]] = []
    backend.generate(request, lambda i, n: steps.append((i, n)))
    call = built[0].calls[0]
    assert call["denoising_strength"] == 0.35 and call["num_inference_steps"] == 7  # ⌈20 × .35⌉
    assert call["input_image"].size == (512, 512) and call["input_image"].mode == "RGB"
    assert steps[-1] == (7, 7)


def test_an_upscale_samples_tiles_no_larger_than_a_full_image(tmp_path: Path) -> None:
    """2048² out of calls of at most 1024² each: the plan budgets for max_pixels, no more."""
    backend, built = cpu_backend(tmp_path)
    backend.load()
    start = tmp_path / "start.png"
    Image.new("RGB", (1024, 1024), (10, 200, 30)).save(start)
    request = ImageRequest(prompt="fox", seed=5, steps=20, width=2048, height=2048,
                           guidance=3.5, init_image=str(start), strength=0.3,
                           upscale_tile=1024)
    [image] = backend.generate(request, lambda i, n: None)
    calls = built[0].calls
    assert image.size == (2048, 2048) and len(calls) == 9  # 3 × 3 overlapping tiles
    assert all((c["width"], c["height"]) == (1024, 1024) for c in calls)
    assert all(c["denoising_strength"] == 0.3 and c["num_inference_steps"] == 6 for c in calls)
    assert all(c["input_image"].size == (1024, 1024) and c["seed"] == 5 for c in calls)


def test_backend_reduce_memory_walks_the_ladder_then_gives_up(tmp_path: Path) -> None:
    # (a FakePipe has no DiT for max's float8 compute to convert)
    backend, built = cpu_backend(tmp_path, preset="max", vram_limit_gib=40.0,
                                 float8_compute=False)
    backend.load()
    presets = [backend.plan.preset]
    while backend.reduce_memory():
        presets.append(backend.plan.preset)
        assert len(presets) < 20
    assert presets[:3] == ["max", "balanced", "low"] and len(built) == len(presets)
    assert dataclasses.asdict(built[-1].plan) == dataclasses.asdict(backend.plan)


def test_backend_says_clearly_when_cuda_is_missing(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = ModelSection(models_dir=str(tmp_path))
    fill(tmp_path, config)
    with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
        FluxBackend(config).load()


class PipeWithBlocks(FakePipe):
    """A fake pipeline whose DiT has block lists (one float8-sized linear, one too small for
    float8), and whose call can fail like a compiler."""

    def __init__(self, plan, paths) -> None:
        super().__init__(plan, paths)
        self.fail_with: BaseException | None = None
        self.dit = torch.nn.Module()
        self.dit.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(n, 2 * n).to(torch.bfloat16)) for n in (32, 4))
        self.dit.single_blocks = torch.nn.ModuleList([torch.nn.Identity()])

    fail_once = False

    def __call__(self, **kwargs):
        if self.fail_with is not None:
            error = self.fail_with
            if self.fail_once:
                self.fail_with = None
            raise error
        return super().__call__(**kwargs)


def test_float8_compute_converts_the_resident_dit_in_max_only(tmp_path: Path, caplog) -> None:
    from engine.flux.float8_compute import Float8Linear

    backend, built = cpu_backend(tmp_path, PipeWithBlocks, preset="max", float8_compute=True)
    backend.load()
    assert isinstance(built[0].dit.blocks[0][0], Float8Linear)
    assert backend.float8 is not None and backend.float8.layers == 1
    backend.close()
    assert backend.float8 is None

    backend, built = cpu_backend(tmp_path, PipeWithBlocks, preset="low", float8_compute=True)
    with caplog.at_level("WARNING"):
        backend.load()
    assert type(built[0].dit.blocks[0][0]) is torch.nn.Linear and backend.float8 is None
    assert "float8_compute applies to DiT block streaming with model.layer_cast, and to the " \
        "max preset when set to true (plan: low)" in caplog.text


def test_float8_auto_keeps_bf16_where_it_was_not_measured_to_pay(tmp_path: Path,
                                                                 caplog) -> None:
    """The default, "auto", on any device but CUDA or with uncompiled blocks: bf16, planned so
    (bf16 copies allowed), said in the log as a note, not a warning."""
    for model in ({"preset": "max"}, {"preset": "max", "compile": False}):
        backend, built = cpu_backend(tmp_path, PipeWithBlocks, **model)
        assert backend.config.float8_compute == "auto"
        with caplog.at_level("INFO"):
            backend.load()
        assert type(built[0].dit.blocks[0][0]) is torch.nn.Linear and backend.float8 is None
        assert not backend.plan.float8_matmul  # planned with bf16 copies allowed
        assert "runs float8 matmuls only in compiled blocks on a CUDA GPU" in caplog.text
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        backend.close()
        caplog.clear()


def test_float8_auto_keeps_max_in_bf16_on_a_float8_gpu(tmp_path: Path, monkeypatch,
                                                      caplog) -> None:
    """On a GPU that runs float8 matmuls, with compiled blocks (both faked here), "auto" still
    leaves max's bf16 DiT as it is; only true re-quantizes it (the test above)."""
    from engine.flux import backend as flux_backend
    from engine.flux import float8_compute, presets

    for module in (flux_backend, presets):  # as on a CUDA GPU, compiled
        monkeypatch.setattr(module, "float8_wanted", lambda model: True)
    monkeypatch.setattr(float8_compute, "check_float8_matmul", lambda device: None)
    backend, built = cpu_backend(tmp_path, PipeWithBlocks, preset="max")
    with caplog.at_level("INFO"):
        backend.load()
    assert type(built[0].dit.blocks[0][0]) is torch.nn.Linear and backend.float8 is None
    assert "and to the max preset when set to true (plan: max)" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_float8_compute_gives_the_block_streamed_layers_float8_matmuls(tmp_path: Path,
                                                                       monkeypatch) -> None:
    """low with the block streamer and layer_cast (the default): float8_compute routes the
    streamed DiT's layers to float8 matmuls on their stored weights (the streamer is patched
    in; its own tests are in test_float8_compute.py)."""
    from engine.flux.float8_compute import Float8CastLinear
    from engine.flux.streaming import enable_block_streaming
    from tests.test_residency import make_models, plan_for

    handles = []

    def stream(self):  # the streamer the real loader makes, on test_residency's tiny DiT
        if not handles:
            model, _ = make_models()
            handles.append(enable_block_streaming(model, plan_for(model, ["streamed"] * 7),
                                                  "cpu", layer_cast=True))
        return handles[0]

    monkeypatch.setattr(FluxBackend, "_stream", property(stream))
    backend, _ = cpu_backend(tmp_path, PipeWithBlocks, preset="low", float8_compute=True)
    backend.load()
    assert backend.float8 is not None and backend.float8.streamed and backend.float8.layers == 32
    assert type(handles[0].dit.blocks[0].attn.a_to_qkv) is Float8CastLinear
    handles[0].close()


def compiling_backend(tmp_path: Path, monkeypatch, fail_with=None):
    """A loaded max backend on a fake pipe, its plan pointed at a CUDA device (the fake never
    touches it: torch.cuda.synchronize is replaced) so that _compile runs."""
    backend, built = cpu_backend(tmp_path, PipeWithBlocks, preset="max")
    backend.load()
    backend.plan = dataclasses.replace(backend.plan, device="cuda")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    built[0].fail_with = fail_with
    return backend, built[0]


def test_compile_binds_one_compiled_forward_per_block_type_and_warms_up_sizes_and_passes(
        tmp_path: Path, monkeypatch) -> None:
    """The warm-up: a whole pass at the largest size (the memory peak), then 512², alone and a
    whole pass, whose images a block computes several at once: every graph the blocks need
    later (sizes, one image or a chunk of several) is compiled at start-up."""
    backend, pipe = compiling_backend(tmp_path, monkeypatch)
    backend._compile()
    assert backend._try_warm_up() is False  # the start-up warm-up runs the compiler
    first, second = pipe.dit.blocks
    assert "forward" in first.__dict__ and "forward" in pipe.dit.single_blocks[0].__dict__
    assert first.forward.__func__ is second.forward.__func__  # one graph per block type
    assert [(c["width"], c["height"]) for c in pipe.calls] == [(1024, 1024), (512, 512),
                                                               (512, 512)]
    assert pipe.batches == [4, 4, 1, 1, 4, 4]  # two steps each
    assert backend.compile_seconds is not None
    # what /status shows: the fake DiT's two double and one single block, all on the GPU
    assert backend.model_state() == ModelState("max", 3, 3, compiled=True)


def test_a_compiler_failure_leaves_the_blocks_eager_and_the_backend_working(
        tmp_path: Path, monkeypatch, caplog) -> None:
    backend, pipe = compiling_backend(tmp_path, monkeypatch,
                                      RuntimeError("Cannot find a working triton installation"))
    backend._compile()
    pipe.fail_once = True
    with caplog.at_level("WARNING"):
        assert backend._try_warm_up() is False  # warmed up again, eager
    assert "torch.compile failed" in caplog.text and "triton" in caplog.text
    assert all("forward" not in b.__dict__ for b in [*pipe.dit.blocks, *pipe.dit.single_blocks])
    assert backend.compile_seconds is None
    assert backend.model_state() == ModelState("max", 3, 3, compiled=False, compile_failed=True)
    pipe.fail_with = None
    request = ImageRequest(prompt="fox", seed=1, steps=2, width=512, height=512, guidance=3.5)
    assert backend.generate(request, lambda i, n: None)[0].size == (512, 512)
    backend.close()  # as a failed re-plan leaves it: /status says the next image reloads it
    assert backend.model_state() == ModelState("max", loaded=False)


def test_running_out_of_memory_while_warming_up_is_reported_not_hidden(tmp_path: Path,
                                                                      monkeypatch) -> None:
    backend, _ = compiling_backend(tmp_path, monkeypatch, torch.cuda.OutOfMemoryError("oom"))
    backend._compile()
    assert backend._try_warm_up() is True  # the calibration tightens the plan
    assert backend._compiled  # an OOM is no compiler failure


def test_compile_is_skipped_off_cuda(tmp_path: Path) -> None:
    backend, built = cpu_backend(tmp_path, PipeWithBlocks, preset="max", compile=True)
    backend.load()
    assert "forward" not in built[0].dit.blocks[0].__dict__ and not built[0].calls


class RecordingDecoder(torch.nn.Module):
    """Like diffsynth's decoder, its tiled path calls ``self.forward`` again for each tile."""

    def __init__(self) -> None:
        super().__init__()
        self.decoded: list[bool] = []  # each whole decode of a latent: tiled or not

    def forward(self, sample, tiled=False, tile_size=128, tile_stride=64, **kwargs):
        tiles = [self.forward(None, tiled=False)["tiled"] for _ in range(2)] if tiled else []
        if sample is not None:  # a real latent from the pipeline: decoded as itself
            self.decoded.append(tiled)
            return sample
        return {"tiled": tiled, "tile_size": tile_size, "tile_stride": tile_stride,
                "tiles_tiled": tiles}


def test_only_the_vae_decode_is_tiled_never_the_dit(tmp_path: Path) -> None:
    """diffsynth's ``tiled`` flag would also run the DiT tile by tile (nine passes a step at
    1024²); the backend passes tiled=False and tiles the decoder alone when the plan says so."""
    from engine.flux.vae_tiling import TILE_SIZE, TILE_STRIDE, tile_vae

    backend, built = cpu_backend(tmp_path)
    backend.load()
    pipe = built[0]
    pipe.vae_decoder = RecordingDecoder()
    backend.plan = dataclasses.replace(backend.plan, vae_tiled=True)
    request = ImageRequest(prompt="fox", seed=1, steps=2, width=1024, height=1024, guidance=3.5)
    backend.generate(request, lambda i, n: None)
    assert pipe.calls[-1]["tiled"] is False  # the DiT is never tiled
    assert pipe.vae_decoder.decoded == [True]  # the decode is
    # what diffsynth's decode call passes is overridden: the decoder tiles itself
    assert pipe.vae_decoder(None, tiled=False, tile_size=128, tile_stride=64) == {
        "tiled": True, "tile_size": TILE_SIZE, "tile_stride": TILE_STRIDE,
        "tiles_tiled": [False, False]}  # each tile decodes plainly: no recursion
    backend.plan = dataclasses.replace(backend.plan, vae_tiled=False)
    backend.generate(request, lambda i, n: None)
    assert pipe.vae_decoder(None, tiled=False)["tiled"] is False
    tile_vae(pipe, False)  # idempotent
    assert "forward" not in pipe.vae_decoder.__dict__


def test_a_tiled_plan_tiles_the_image_to_image_encode_too(tmp_path: Path) -> None:
    """The start image's encode is a phase budgeted like the tiled decode: with the plan's VAE
    tiled, diffsynth's untiled encode call is tiled in 512-pixel tiles."""
    from engine.flux.vae_tiling import ENCODE_TILE_SIZE, ENCODE_TILE_STRIDE, tile_vae

    pipe = FakePipe(None, None)
    pipe.vae_encoder = RecordingDecoder()
    tile_vae(pipe, True)
    assert pipe.vae_encoder(None, tiled=False, tile_size=128, tile_stride=64) == {
        "tiled": True, "tile_size": ENCODE_TILE_SIZE, "tile_stride": ENCODE_TILE_STRIDE,
        "tiles_tiled": [False, False]}
    assert ENCODE_TILE_SIZE == 512
    tile_vae(pipe, False)
    assert "forward" not in pipe.vae_encoder.__dict__


def test_a_batch_decodes_one_latent_at_a_time_through_the_tiled_decoder(tmp_path: Path) -> None:
    """The plan budgets the VAE for one image: a batch of two is two tiled decodes, and the
    tiling wrapper is still in place afterwards."""
    backend, built = cpu_backend(tmp_path)
    backend.load()
    pipe = built[0]
    pipe.vae_decoder = RecordingDecoder()
    backend.plan = dataclasses.replace(backend.plan, vae_tiled=True)
    request = ImageRequest(prompt="fox", seed=1, steps=1, width=1024, height=1024, guidance=3.5,
                           count=2)
    assert len(backend.generate(request, lambda i, n: None)) == 2
    assert pipe.batches == [2] and pipe.vae_decoder.decoded == [True, True]
    assert "forward" in pipe.vae_decoder.__dict__  # tile_vae's, not the batch's
    assert pipe.vae_decoder(None)["tiled"] is True
