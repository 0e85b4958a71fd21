"""Prompt embeddings kept between jobs (engine/flux/prompt_cache.py): diffsynth's own prompt
unit and unit runner, with counting text encoders in place of CLIP and T5."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")

from diffsynth.diffusion.base_pipeline import PipelineUnitRunner  # noqa: E402
from diffsynth.pipelines.flux_image import FluxImageUnit_PromptEmbedder  # noqa: E402
from PIL import Image  # noqa: E402

from engine.config import ConfigError, load_config  # noqa: E402
from engine.flux.prompt_cache import PromptCache  # noqa: E402
from engine.request import ImageRequest  # noqa: E402
from tests.test_flux_builder import FakePipe, cpu_backend  # noqa: E402


class Tokenizer:
    """Token ids from the prompt's characters, padded to ``max_length`` as the real ones are."""

    def __call__(self, prompt, max_length, **kwargs):
        ids = [ord(c) % 1000 for c in prompt][:max_length]
        ids += [0] * (max_length - len(ids))
        return SimpleNamespace(input_ids=torch.tensor([ids]))


class Clip(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        return input_ids.float().sum(dim=1, keepdim=True).repeat(1, 8), None  # pooled, hidden


class T5(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        return torch.sin(input_ids.float())[..., None].repeat(1, 1, 16).to(torch.bfloat16)


class TextPipe:
    """The attributes diffsynth's prompt unit reads from a FluxImagePipeline."""

    def __init__(self) -> None:
        self.device = "cpu"
        self.tokenizer_1 = self.tokenizer_2 = Tokenizer()
        self.text_encoder_1, self.text_encoder_2 = Clip(), T5()
        self.units = [FluxImageUnit_PromptEmbedder()]

    def encode(self, prompt: str, cfg_scale: float = 1.0, t5_sequence_length: int = 32) -> dict:
        """What ``FluxImagePipeline.__call__`` does with the unit: the runner, positive side."""
        shared = {"cfg_scale": cfg_scale, "t5_sequence_length": t5_sequence_length}
        posi = {"prompt": prompt, "positive": True}
        nega = {"negative_prompt": "", "positive": False}
        PipelineUnitRunner()(self.units[0], self, shared, posi, nega)
        return posi

    @property
    def encoder_calls(self) -> tuple[int, int]:
        return self.text_encoder_1.calls, self.text_encoder_2.calls


def same(a: dict, b: dict) -> bool:
    names = ("prompt_emb", "pooled_prompt_emb", "text_ids")
    return all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in names)


def test_a_prompt_seen_before_skips_both_encoders_and_gives_the_same_tensors() -> None:
    plain, cached = TextPipe(), TextPipe()
    cache = PromptCache(entries=4)
    assert cache.install(cached)
    first = cached.encode("a red fox in snow")
    again = cached.encode("a red fox in snow")
    assert cached.encoder_calls == (1, 1) and (cache.hits, cache.misses) == (1, 1)
    assert same(first, again) and same(again, plain.encode("a red fox in snow"))
    cached.encode("a grey wolf")
    assert cached.encoder_calls == (2, 2)


def test_the_t5_length_is_part_of_the_key() -> None:
    pipe = TextPipe()
    PromptCache(entries=4).install(pipe)
    short, long = pipe.encode("fox", t5_sequence_length=16), pipe.encode("fox")
    assert pipe.encoder_calls == (2, 2)
    assert short["prompt_emb"].shape[1] == 16 and long["prompt_emb"].shape[1] == 32


def test_the_least_recently_used_prompt_goes_first() -> None:
    pipe = TextPipe()
    cache = PromptCache(entries=2)
    cache.install(pipe)
    for prompt in ("a", "b", "a", "c"):  # "a" was used after "b": "b" goes
        pipe.encode(prompt)
    assert len(cache) == 2 and pipe.encoder_calls == (3, 3)
    pipe.encode("a")
    assert pipe.encoder_calls == (3, 3)
    pipe.encode("b")
    assert pipe.encoder_calls == (4, 4)


def test_a_hit_returns_copies_the_job_may_change() -> None:
    pipe = TextPipe()
    PromptCache(entries=2).install(pipe)
    first = pipe.encode("fox")
    first["prompt_emb"].zero_()  # what a later unit could do to its input in place
    assert pipe.encode("fox")["prompt_emb"].abs().sum() > 0


def test_off_with_zero_entries_and_on_pipelines_without_the_unit() -> None:
    pipe = TextPipe()
    assert not PromptCache(entries=0).install(pipe)
    pipe.encode("fox"), pipe.encode("fox")
    assert pipe.encoder_calls == (2, 2)
    assert not PromptCache(entries=4).install(SimpleNamespace())  # a test's fake pipeline


def test_an_encoder_that_fails_stores_nothing() -> None:
    pipe = TextPipe()
    cache = PromptCache(entries=4)
    cache.install(pipe)

    def out_of_memory(input_ids):
        raise RuntimeError("CUDA out of memory")

    pipe.text_encoder_2.forward = out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):
        pipe.encode("fox")
    assert len(cache) == 0


class UnitPipe(FakePipe):
    """The backend's fake pipeline, its prompt embedding made by diffsynth's prompt unit."""

    def __init__(self, plan, paths) -> None:
        super().__init__(plan, paths)
        self.text = TextPipe()
        self.units = self.text.units

    def __call__(self, **kwargs):
        self.embeddings = self.text.encode(kwargs["prompt"])  # the unit, as diffsynth runs it
        return super().__call__(**kwargs)


def test_the_backend_encodes_a_re_roll_and_an_upscales_tiles_once(tmp_path: Path) -> None:
    backend, built = cpu_backend(tmp_path, pipe_class=UnitPipe)
    backend.load()
    fox = ImageRequest(prompt="fox", seed=1, steps=2, width=512, height=512, guidance=3.5)
    backend.generate(fox, lambda i, n: None)
    backend.generate(ImageRequest(prompt="fox", seed=2, steps=2, width=512, height=512,
                                  guidance=3.5), lambda i, n: None)
    text = built[0].text
    assert text.encoder_calls == (1, 1)
    start = tmp_path / "start.png"
    Image.new("RGB", (512, 512), (10, 200, 30)).save(start)
    backend.generate(ImageRequest(prompt="owl", seed=5, steps=4, width=1024, height=1024,
                                  guidance=3.5, init_image=str(start), strength=0.3,
                                  upscale_tile=512), lambda i, n: None)
    assert len(built[0].calls) == 2 + 9 and text.encoder_calls == (2, 2)  # 9 tiles, 1 encode


def test_a_reloaded_pipeline_starts_with_an_empty_cache(tmp_path: Path) -> None:
    """After an out-of-memory re-plan that reloads, the text encoders may hold other weights
    (T5 in bf16 under max, float8 when streamed): nothing encoded before is used."""
    backend, built = cpu_backend(tmp_path, pipe_class=UnitPipe, preset="max",
                                 vram_limit_gib=40.0, float8_compute=False)  # a fake: no DiT
    backend.load()
    fox = ImageRequest(prompt="fox", seed=1, steps=2, width=512, height=512, guidance=3.5)
    backend.generate(fox, lambda i, n: None)
    assert len(backend.prompts) == 1
    assert backend.reduce_memory() and len(built) == 2  # max -> balanced: loaded again
    assert len(backend.prompts) == 0
    backend.generate(fox, lambda i, n: None)
    assert built[1].text.encoder_calls == (1, 1)


def test_every_calibration_warm_up_runs_the_text_encoders(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm-up over the budget tightens the plan in place (no reload) and warms up again
    with the same prompt: that warm-up must still run T5, or its phase goes unmeasured."""
    import dataclasses

    import engine.flux.backend as fb
    import engine.flux.pipeline as fp

    backend, built = cpu_backend(tmp_path, pipe_class=UnitPipe, preset="low", vram_limit_gib=8.0)
    backend.load()  # on the CPU: no calibration at load
    backend._factory = None  # as in production: a plan of the same layout is applied in place
    monkeypatch.setattr(fp, "set_vram_limit", lambda pipe, gib: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)

    class Budget:
        growth_gib = 1.0

        def describe(self) -> str:
            return "budget"

        def tightened(self, gib: float) -> Budget:
            return self

    backend.plan = dataclasses.replace(backend.plan, device_budget=Budget())
    t5 = built[0].text.text_encoder_2
    t5_calls_at_each_peak: list[int] = []

    def grown(torch_module) -> float:
        t5_calls_at_each_peak.append(t5.calls)
        return 1.0

    excess = iter([0.5, 0.0])  # the first warm-up over the budget, the second within it
    monkeypatch.setattr(backend, "_grown_gib", grown)
    monkeypatch.setattr(fb, "calibration_excess_gib", lambda budget, gib: next(excess))
    backend._calibrate()
    assert len(built) == 1  # tightened in place
    assert t5_calls_at_each_peak == [1, 2]


def test_config_bounds(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[model]\nprompt_cache = -1\n")
    with pytest.raises(ConfigError, match="model.prompt_cache"):
        load_config(path)
    path.write_text("[model]\nprompt_cache = 0\n")
    assert load_config(path).model.prompt_cache == 0
