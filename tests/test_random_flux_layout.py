"""The random FLUX checkpoint has the real layout: diffsynth's hashes, converters and tokenizers.

Nothing large is written: the hashes are taken from key/shape lists on the meta device, and the
converters are checked against diffsynth's own model classes built on the meta device.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")

from diffsynth.core.loader.file import hash_model_file, hash_state_dict_keys  # noqa: E402
from diffsynth.models.flux_dit import FluxDiT  # noqa: E402
from diffsynth.models.flux_text_encoder_clip import FluxTextEncoderClip  # noqa: E402
from diffsynth.models.flux_text_encoder_t5 import FluxTextEncoderT5  # noqa: E402
from diffsynth.models.flux_vae import FluxVAEDecoder, FluxVAEEncoder  # noqa: E402
from diffsynth.utils.state_dict_converters import (  # noqa: E402
    flux_dit,
    flux_text_encoder_clip,
    flux_text_encoder_t5,
    flux_vae,
)

from bench import make_random_flux as mrf  # noqa: E402

LAYOUT = mrf.flux_layout()


def meta_state_dict(part: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for rel in mrf.files_of(part):
        for key, shape in LAYOUT[rel].items():
            tensors[key] = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    return tensors


def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize("part", ["dit", "clip", "t5", "vae"])
def test_hash_matches_diffsynth_registry(part: str) -> None:
    assert hash_state_dict_keys(meta_state_dict(part)) == mrf.EXPECTED_HASHES[part]


def test_expected_hashes_are_the_ones_diffsynth_registers() -> None:
    from diffsynth.configs.model_configs import flux_series

    registered: dict[str, set[str]] = {}
    for entry in flux_series:
        registered.setdefault(entry["model_hash"], set()).add(entry["model_name"])
    assert registered[mrf.EXPECTED_HASHES["dit"]] == {"flux_dit"}
    assert registered[mrf.EXPECTED_HASHES["clip"]] == {"flux_text_encoder_clip"}
    assert registered[mrf.EXPECTED_HASHES["t5"]] == {"flux_text_encoder_t5"}
    assert registered[mrf.EXPECTED_HASHES["vae"]] == {"flux_vae_encoder", "flux_vae_decoder"}


CONVERTED = [
    ("dit", FluxDiT, flux_dit.FluxDiTStateDictConverter),
    ("clip", FluxTextEncoderClip, flux_text_encoder_clip.FluxTextEncoderClipStateDictConverter),
    ("t5", FluxTextEncoderT5, flux_text_encoder_t5.FluxTextEncoderT5StateDictConverter),
    ("vae", FluxVAEEncoder, flux_vae.FluxVAEEncoderStateDictConverter),
    ("vae", FluxVAEDecoder, flux_vae.FluxVAEDecoderStateDictConverter),
]


@pytest.mark.parametrize(("part", "model_class", "converter"), CONVERTED,
                         ids=[f"{p}-{c.__name__}" for p, c, _ in CONVERTED])
def test_converted_keys_fill_diffsynths_model_exactly(part, model_class, converter) -> None:
    with torch.device("meta"):
        model = model_class()
    converted = converter(meta_state_dict(part))
    assert shapes(converted) == shapes(model.state_dict())


def test_t5_file_has_no_tied_embedding_and_clip_keeps_hub_prefix() -> None:
    t5_keys = set(LAYOUT[mrf.T5_FILES[0]]) | set(LAYOUT[mrf.T5_FILES[1]])
    assert "shared.weight" in t5_keys and "encoder.embed_tokens.weight" not in t5_keys
    assert all(k.startswith("text_model.") for k in LAYOUT[mrf.CLIP_FILE])


def test_t5_shards_split_every_key_once() -> None:
    first, second = (LAYOUT[f] for f in mrf.T5_FILES)
    assert first and second and not set(first) & set(second)
    assert set(first) | set(second) == set(mrf.t5_layout())


def test_total_size_is_flux_dev_bf16() -> None:
    params = {part: sum(mrf._numel(s) for rel in mrf.files_of(part) for s in LAYOUT[rel].values())
              for part in ("dit", "clip", "t5", "vae")}
    assert 11.8e9 < params["dit"] < 12.0e9  # FLUX.1-dev: 11.9 B parameters
    assert 4.7e9 < params["t5"] < 4.8e9
    assert 120e6 < params["clip"] < 125e6
    assert 80e6 < params["vae"] < 90e6


def test_written_file_is_detected_by_diffsynth(tmp_path) -> None:
    root = mrf.make(tmp_path, parts=("vae",))
    path = root / mrf.VAE_FILE
    assert hash_model_file(str(path)) == mrf.EXPECTED_HASHES["vae"]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        weight = f.get_tensor("decoder.conv_out.weight")
    assert weight.dtype == torch.bfloat16
    assert 0.01 < float(weight.float().std()) < 0.03  # small normal values, not zeros


def test_tokenizers_load_and_stay_inside_the_vocabularies(tmp_path) -> None:
    from transformers import CLIPTokenizer, T5TokenizerFast

    root = mrf.make(tmp_path, parts=("tokenizers",))
    clip = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    t5 = T5TokenizerFast.from_pretrained(str(root / "tokenizer_2"))
    prompt = "A red fox in snow, 35mm — «ÄÖ» 漢字 😀"
    clip_ids = clip(prompt, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    t5_ids = t5(prompt, padding="max_length", max_length=512, truncation=True,
                return_tensors="pt").input_ids
    assert clip_ids.shape == (1, 77) and 0 <= int(clip_ids.min()) and int(clip_ids.max()) < 49408
    assert t5_ids.shape == (1, 512) and 0 <= int(t5_ids.min()) and int(t5_ids.max()) < 32128
    assert len(set(clip_ids[0].tolist())) > 5 and len(set(t5_ids[0].tolist())) > 5
