"""Host memory while loading: the weights arrive once, in the dtype asked for, and no second copy
(file pages, freed heap, a duplicate model, a duplicate embedding) stays resident.

Peaks are read from the kernel (VmHWM, reset through /proc/self/clear_refs) around one step, on
CLIP's real file layout (246 MB of bf16, the smallest FLUX file that diffsynth recognises).
"""

from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")

from bench import make_random_flux as mrf  # noqa: E402
from engine.flux import host_memory  # noqa: E402
from engine.flux.host_memory import frugal_loading, resident_bytes  # noqa: E402
from engine.flux.model_files import ModelPaths  # noqa: E402
from engine.flux.presets import make_plan, streamed  # noqa: E402
from engine.flux.residency import STREAMED, OtherWeights, ResidencyPlan  # noqa: E402
from engine.flux.streaming import enable_block_streaming, measure_blocks  # noqa: E402

MIB = 2**20
FP8 = torch.float8_e4m3fn


def peak_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("no /proc/self/clear_refs to reset the peak RSS")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flux") / "text_encoder" / "model.safetensors"
    mrf.write_weights(path, mrf.clip_layout(), 0.02, "cpu")
    return path


def load_clip(path: Path, dtype: torch.dtype = FP8) -> torch.nn.Module:
    """CLIP through diffsynth's loader exactly as its ModelPool calls it (DiskMap, converter)."""
    from diffsynth.core.loader import load_model
    from diffsynth.models.flux_text_encoder_clip import FluxTextEncoderClip
    from diffsynth.utils.state_dict_converters.flux_text_encoder_clip import (
        FluxTextEncoderClipStateDictConverter,
    )

    return load_model(FluxTextEncoderClip, str(path), torch_dtype=dtype, device="cpu",
                      state_dict_converter=FluxTextEncoderClipStateDictConverter,
                      use_disk_map=True)


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_frugal_loading_sets_diffsynths_window_and_puts_everything_back(monkeypatch):
    from diffsynth.core.vram.disk_map import DiskMap

    monkeypatch.setenv(host_memory.DISK_MAP_ENV, "123")
    with frugal_loading(window_params=4567):
        assert os.environ[host_memory.DISK_MAP_ENV] == "4567"
        assert DiskMap([], "cpu").buffer_size == 4567  # what diffsynth's loader reads
    assert os.environ[host_memory.DISK_MAP_ENV] == "123"
    monkeypatch.delenv(host_memory.DISK_MAP_ENV)
    with pytest.raises(RuntimeError), frugal_loading():
        raise RuntimeError("a failed load")
    assert host_memory.DISK_MAP_ENV not in os.environ


def test_frugal_loading_gives_the_same_float8_weights(clip_file):
    from safetensors import safe_open

    plain = load_clip(clip_file)
    with frugal_loading(window_params=5_000_000):  # reopens the file dozens of times
        frugal = load_clip(clip_file)
    params = dict(frugal.named_parameters())
    assert params.keys() == dict(plain.named_parameters()).keys()
    for name, p in plain.named_parameters():
        assert p.dtype == params[name].dtype == FP8
        assert torch.equal(raw(p), raw(params[name])), name
    with safe_open(str(clip_file), "pt") as f:  # and both are the file's values in float8
        want = f.get_tensor("text_model.encoder.layers.3.mlp.fc1.weight").to(FP8)
    assert torch.equal(raw(frugal.encoders[3].fc1.weight), raw(want))


def test_loading_holds_the_weights_once_and_no_file_pages(clip_file):
    """Without the fix diffsynth keeps the whole 246 MB bf16 file mapped while it converts
    (its window is 10⁹ parameters), on top of the 123 MB of float8 weights."""
    gc.collect()
    before = resident_bytes()
    peak_reset()
    with frugal_loading(window_params=5_000_000):
        model = load_clip(clip_file)
    peak, after = peak_bytes() - before, resident_bytes() - before
    weights = weight_bytes(model)
    largest = max(p.numel() for p in model.parameters())  # the token embedding, 38 M
    window = 2 * (5_000_000 + largest)  # bf16 file pages mapped at most
    assert 100 * MIB < weights < 130 * MIB
    assert peak <= weights + window + largest + 32 * MIB, (peak / MIB, weights / MIB)
    assert after <= weights + 16 * MIB, (after / MIB, weights / MIB)


def test_clips_second_model_is_dropped_at_once(clip_file):
    """The CLIP file also matches diffsynth's Stable Diffusion text encoder, so its ModelPool
    loads it twice; the pipeline keeps one."""
    from diffsynth.core import ModelConfig
    from diffsynth.models.flux_text_encoder_clip import FluxTextEncoderClip
    from diffsynth.models.stable_diffusion_text_encoder import SDTextEncoder
    from diffsynth.pipelines.flux_image import FluxImagePipeline

    from engine.flux.pipeline import _load_into

    pipe = FluxImagePipeline(device="cpu", torch_dtype=torch.bfloat16)
    config = ModelConfig(path=str(clip_file), skip_download=True, computation_device="cpu",
                         computation_dtype=torch.bfloat16)
    _load_into(pipe, config, None)
    assert isinstance(pipe.text_encoder_1, FluxTextEncoderClip)
    assert not [o for o in gc.get_objects() if type(o) is SDTextEncoder]


def tiny_t5_file(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A small T5 encoder in the hub's key layout (no ``encoder.embed_tokens``), loaded back
    the way diffsynth loads it: its converter gives embed_tokens a copy of shared.weight."""
    from diffsynth.utils.state_dict_converters.flux_text_encoder_t5 import (
        FluxTextEncoderT5StateDictConverter,
    )
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3,
                      feed_forward_proj="gated-gelu")
    state = {k: v.clone() for k, v in T5EncoderModel(config).state_dict().items()
             if k != "encoder.embed_tokens.weight"}
    path = tmp_path / "t5.safetensors"
    save_file(state, str(path))
    model = T5EncoderModel(config)
    model.load_state_dict(FluxTextEncoderT5StateDictConverter(load_file(str(path))), assign=True)
    return model.to(FP8), path


def test_t5_embedding_loaded_twice_is_shared_again(tmp_path):
    from engine.flux.pipeline import share_t5_embedding

    model, _ = tiny_t5_file(tmp_path)
    count = len(list(model.parameters()))
    assert model.shared.weight is not model.encoder.embed_tokens.weight  # diffsynth's result
    assert share_t5_embedding(model)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert len(list(model.parameters())) == count - 1
    assert not share_t5_embedding(model)  # already one
    with torch.no_grad():
        model.encoder.embed_tokens.weight = torch.nn.Parameter(model.shared.weight.clone())
        model.encoder.embed_tokens.weight.view(torch.uint8)[0, 0] += 1
    assert not share_t5_embedding(model)  # different values: left alone


def test_the_dits_budget_reserves_what_t5_and_resident_models_will_hold(tmp_path, clip_file):
    """The DiT is laid out before T5 is loaded; the bytes reserved for T5 ahead, from its file's
    header, are what the streamer then keeps for T5 (``fixed``), and the VAE's are split into
    its encoder's and decoder's (each fetched in its own phase when parked)."""
    from engine.flux.pipeline import T5_BLOCKS, other_weights, share_t5_embedding

    model, t5_path = tiny_t5_file(tmp_path)
    share_t5_embedding(model)
    _, fixed = measure_blocks(model, block_lists=T5_BLOCKS)
    vae = tmp_path / "ae.safetensors"
    mrf.write_weights(vae, {"decoder.conv_in.weight": (8, 4, 3, 3),
                            "encoder.conv_in.weight": (4, 3, 3, 3)}, 0.02, "cpu")
    paths = ModelPaths(dit="", text_encoder=str(clip_file), text_encoder_2=[str(t5_path)],
                       vae=str(vae), tokenizer="", tokenizer_2="")
    clip = 2 * sum(mrf._numel(s) for s in mrf.clip_layout().values())
    for preset, budget in (("low", 8.0), ("balanced", 20.0)):  # CLIP, VAE: resident bf16
        plan = make_plan(preset, "cuda", budget, stream_dit=True, park_models=True)
        assert other_weights(plan, paths) == OtherWeights(
            text=fixed + clip, encode=2 * 4 * 3 * 9, decode=2 * 8 * 4 * 9, parked=True)
        kept = dataclasses.replace(plan, park_models=False)  # model.park_models = false
        assert not other_weights(kept, paths).parked
    managed_clip = dataclasses.replace(plan, clip=streamed("cuda", "bfloat16"))
    assert other_weights(managed_clip, paths).text == fixed  # not counted
    unstreamed = make_plan("balanced", "cuda", 20.0, stream_dit=False)
    assert not other_weights(unstreamed, paths).parked


class Blocks(torch.nn.Module):
    def __init__(self, n: int, side: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList()
        for _ in range(n):
            block = torch.nn.Module()
            for name in ("a", "b"):  # 4 MiB float8 matrices, under glibc's 32 MiB threshold
                bits = torch.randint(0, 120, (side, side), dtype=torch.uint8)
                block.register_parameter(name, torch.nn.Parameter(bits.view(FP8),
                                                                  requires_grad=False))
            self.blocks.append(block)


def test_streaming_layout_replaces_the_weights_rather_than_adding_to_them():
    """The streamer fills its host buffer while it frees each block's weights. Weights in glibc's
    heap (every matrix under 32 MiB once a load has run) are only given back by malloc_trim;
    without it the host would hold the streamed blocks twice."""
    host_memory.set_mmap_threshold(host_memory.AFTER_MMAP_THRESHOLD)  # as after any load
    model = Blocks(16, 2048)
    weights = 16 * 2 * 2048 * 2048
    sizes, fixed = measure_blocks(model, block_lists=("blocks",))
    plan = ResidencyPlan((STREAMED,) * 16, tuple(sizes), 10**12, 0, fixed, slots=2)
    gc.collect()
    before = resident_bytes()
    peak_reset()
    handle = enable_block_streaming(model, plan, "cpu", block_lists=("blocks",))
    peak, after = peak_bytes() - before, resident_bytes() - before
    buffers = 2 * 2 * 2048 * 2048 * 2 + 2 * 2 * 2048 * 2048  # bf16 work buffer, two slots
    assert handle.stats()["host_bytes"] >= weights
    assert peak <= buffers + weights // 4, (peak / MIB, weights / MIB)
    assert after <= buffers + 16 * MIB, (after / MIB, weights / MIB)
    handle.close()
