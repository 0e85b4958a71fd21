"""Write a FLUX.1-dev checkpoint made of random weights, in the exact hub layout.

    python bench/make_random_flux.py OUTDIR [--only dit,clip,t5,vae,tokenizers] [--std 0.02]

writes ``OUTDIR/black-forest-labs/FLUX.1-dev/`` with ``flux1-dev.safetensors``,
``text_encoder/model.safetensors``, ``text_encoder_2/model-0000N-of-00002.safetensors``,
``ae.safetensors``, ``tokenizer/`` and ``tokenizer_2/``: real key names, shapes and dtype (bf16),
small normal values. diffsynth recognises a model only by an md5 of its key names and shapes, so
these files load through exactly the code path the real ones take; the images are noise, but the
memory, the speed and every line of the loading and sampling code are real.

The layout is plain data (``flux_layout``), so a CPU test checks the hashes without writing 34 GB.
Values are drawn on the GPU when there is one (tens of GB in about a minute).
"""

from __future__ import annotations

import argparse
import json
import string
import struct
import sys
import time
from pathlib import Path
from typing import Any

Shape = tuple[int, ...]
Layout = dict[str, Shape]
REPO_DIR = Path("black-forest-labs") / "FLUX.1-dev"
DIT_FILE = "flux1-dev.safetensors"
CLIP_FILE = "text_encoder/model.safetensors"
T5_FILES = ("text_encoder_2/model-00001-of-00002.safetensors",
            "text_encoder_2/model-00002-of-00002.safetensors")
VAE_FILE = "ae.safetensors"
# diffsynth's configs/model_configs.py (flux_series): the md5 of sorted "key:shape" and key names.
EXPECTED_HASHES = {
    "dit": "a29710fea6dddb0314663ee823598e50",
    "clip": "94eefa3dac9cec93cb1ebaf1747d7b78",
    "t5": "22540b49eaedbc2f2784b2091a234c7c",
    "vae": "21ea55f476dfc4fd135587abb59dfe5d",
}
PARTS = ("dit", "clip", "t5", "vae", "tokenizers")


# -- layouts (key -> shape), as the files on the hub hold them ------------------------------
def _linear(prefix: str, out_f: int, in_f: int, bias: bool = True) -> Layout:
    layout: Layout = {f"{prefix}.weight": (out_f, in_f)}
    if bias:
        layout[f"{prefix}.bias"] = (out_f,)
    return layout


def dit_layout(dim: int = 3072, double: int = 19, single: int = 38, head_dim: int = 128) -> Layout:
    """Black Forest Labs' own key names (``double_blocks.N.img_attn.qkv`` ...)."""
    layout: Layout = {}
    for name, in_f in (("img_in", 64), ("txt_in", 4096)):
        layout |= _linear(name, dim, in_f)
    for name, in_f in (("time_in", 256), ("guidance_in", 256), ("vector_in", 768)):
        layout |= _linear(f"{name}.in_layer", dim, in_f) | _linear(f"{name}.out_layer", dim, dim)
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            layout |= _linear(f"{p}_mod.lin", 6 * dim, dim)
            layout |= _linear(f"{p}_attn.qkv", 3 * dim, dim) | _linear(f"{p}_attn.proj", dim, dim)
            layout[f"{p}_attn.norm.query_norm.scale"] = (head_dim,)
            layout[f"{p}_attn.norm.key_norm.scale"] = (head_dim,)
            layout |= _linear(f"{p}_mlp.0", 4 * dim, dim) | _linear(f"{p}_mlp.2", dim, 4 * dim)
    for i in range(single):
        p = f"single_blocks.{i}"
        layout |= _linear(f"{p}.linear1", 3 * dim + 4 * dim, dim)
        layout |= _linear(f"{p}.linear2", dim, dim + 4 * dim)
        layout |= _linear(f"{p}.modulation.lin", 3 * dim, dim)
        layout[f"{p}.norm.query_norm.scale"] = (head_dim,)
        layout[f"{p}.norm.key_norm.scale"] = (head_dim,)
    layout |= _linear("final_layer.linear", 64, dim)
    layout |= _linear("final_layer.adaLN_modulation.1", 2 * dim, dim)
    return layout


def clip_layout(dim: int = 768, layers: int = 12, vocab: int = 49408, positions: int = 77) -> Layout:
    """CLIP-L text model with the hub file's ``text_model.`` prefix."""
    p = "text_model"
    layout: Layout = {
        f"{p}.embeddings.token_embedding.weight": (vocab, dim),
        f"{p}.embeddings.position_embedding.weight": (positions, dim),
    }
    for i in range(layers):
        q = f"{p}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layout |= _linear(f"{q}.self_attn.{proj}", dim, dim)
        for norm in ("layer_norm1", "layer_norm2"):
            layout |= {f"{q}.{norm}.weight": (dim,), f"{q}.{norm}.bias": (dim,)}
        layout |= _linear(f"{q}.mlp.fc1", 4 * dim, dim) | _linear(f"{q}.mlp.fc2", dim, 4 * dim)
    layout |= {f"{p}.final_layer_norm.weight": (dim,), f"{p}.final_layer_norm.bias": (dim,)}
    return layout


def t5_layout(dim: int = 4096, ff: int = 10240, layers: int = 24, heads: int = 64,
              vocab: int = 32128, buckets: int = 32) -> Layout:
    """T5 v1.1 XXL encoder; no ``encoder.embed_tokens.weight`` (tied to ``shared.weight``)."""
    layout: Layout = {"shared.weight": (vocab, dim)}
    for i in range(layers):
        b = f"encoder.block.{i}.layer"
        for proj in "qkvo":
            layout[f"{b}.0.SelfAttention.{proj}.weight"] = (dim, dim)
        if i == 0:
            layout[f"{b}.0.SelfAttention.relative_attention_bias.weight"] = (buckets, heads)
        layout[f"{b}.0.layer_norm.weight"] = (dim,)
        layout[f"{b}.1.DenseReluDense.wi_0.weight"] = (ff, dim)
        layout[f"{b}.1.DenseReluDense.wi_1.weight"] = (ff, dim)
        layout[f"{b}.1.DenseReluDense.wo.weight"] = (dim, ff)
        layout[f"{b}.1.layer_norm.weight"] = (dim,)
    layout["encoder.final_layer_norm.weight"] = (dim,)
    return layout


def _resnet(p: str, c_in: int, c_out: int) -> Layout:
    layout: Layout = {}
    layout |= {f"{p}.norm1.weight": (c_in,), f"{p}.norm1.bias": (c_in,)}
    layout |= {f"{p}.conv1.weight": (c_out, c_in, 3, 3), f"{p}.conv1.bias": (c_out,)}
    layout |= {f"{p}.norm2.weight": (c_out,), f"{p}.norm2.bias": (c_out,)}
    layout |= {f"{p}.conv2.weight": (c_out, c_out, 3, 3), f"{p}.conv2.bias": (c_out,)}
    if c_in != c_out:
        layout |= {f"{p}.nin_shortcut.weight": (c_out, c_in, 1, 1), f"{p}.nin_shortcut.bias": (c_out,)}
    return layout


def _vae_mid(p: str, c: int) -> Layout:
    layout = _resnet(f"{p}.block_1", c, c) | _resnet(f"{p}.block_2", c, c)
    layout |= {f"{p}.attn_1.norm.weight": (c,), f"{p}.attn_1.norm.bias": (c,)}
    for conv in ("q", "k", "v", "proj_out"):
        layout |= {f"{p}.attn_1.{conv}.weight": (c, c, 1, 1), f"{p}.attn_1.{conv}.bias": (c,)}
    return layout


def vae_layout(ch: int = 128, mult: tuple[int, ...] = (1, 2, 4, 4), z: int = 16) -> Layout:
    """The FLUX autoencoder (``ae.safetensors``): encoder and decoder, BFL key names."""
    layout: Layout = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    c_in = ch
    for level, m in enumerate(mult):
        for j in range(2):
            layout |= _resnet(f"encoder.down.{level}.block.{j}", c_in, ch * m)
            c_in = ch * m
        if level < len(mult) - 1:
            layout |= {f"encoder.down.{level}.downsample.conv.weight": (c_in, c_in, 3, 3),
                       f"encoder.down.{level}.downsample.conv.bias": (c_in,)}
    layout |= _vae_mid("encoder.mid", c_in)
    layout |= {"encoder.norm_out.weight": (c_in,), "encoder.norm_out.bias": (c_in,)}
    layout |= {"encoder.conv_out.weight": (2 * z, c_in, 3, 3), "encoder.conv_out.bias": (2 * z,)}
    top = ch * mult[-1]
    layout |= {"decoder.conv_in.weight": (top, z, 3, 3), "decoder.conv_in.bias": (top,)}
    layout |= _vae_mid("decoder.mid", top)
    c_in = top
    for level in reversed(range(len(mult))):
        for j in range(3):
            layout |= _resnet(f"decoder.up.{level}.block.{j}", c_in, ch * mult[level])
            c_in = ch * mult[level]
        if level > 0:
            layout |= {f"decoder.up.{level}.upsample.conv.weight": (c_in, c_in, 3, 3),
                       f"decoder.up.{level}.upsample.conv.bias": (c_in,)}
    layout |= {"decoder.norm_out.weight": (ch,), "decoder.norm_out.bias": (ch,)}
    layout |= {"decoder.conv_out.weight": (3, ch, 3, 3), "decoder.conv_out.bias": (3,)}
    return layout


def _split_in_two(layout: Layout) -> tuple[Layout, Layout]:
    """Two shards of about equal bytes, in key order (as the hub's T5 files are split)."""
    sizes = {k: _numel(s) for k, s in layout.items()}
    half, first, second, seen = sum(sizes.values()) / 2, {}, {}, 0
    for key, shape in layout.items():
        (first if seen < half else second)[key] = shape
        seen += sizes[key]
    return first, second


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def flux_layout() -> dict[str, Layout]:
    """Relative file path (under ``black-forest-labs/FLUX.1-dev``) -> key -> shape."""
    t5_first, t5_second = _split_in_two(t5_layout())
    return {DIT_FILE: dit_layout(), CLIP_FILE: clip_layout(), T5_FILES[0]: t5_first,
            T5_FILES[1]: t5_second, VAE_FILE: vae_layout()}


def files_of(part: str) -> tuple[str, ...]:
    return {"dit": (DIT_FILE,), "clip": (CLIP_FILE,), "t5": T5_FILES, "vae": (VAE_FILE,)}[part]


# -- writing ----------------------------------------------------------------------------------
def write_weights(path: Path, layout: Layout, std: float, device: str, metadata: dict | None = None) -> int:
    """Draw every tensor on ``device`` (bf16, N(0, std²)) and write it at once, one tensor at a
    time: the safetensors header first (computed from the layout), then each tensor's bytes, so
    the 24 GB DiT file never sits in memory. Returns bytes written."""
    import torch

    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, shape in layout.items():
        size = 2 * _numel(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    generator = torch.Generator(device=device).manual_seed(len(layout))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in layout.values():
            t = torch.empty(shape, dtype=torch.bfloat16, device=device)
            t.normal_(0.0, std, generator=generator)
            f.write(t.cpu().view(torch.int16).numpy().tobytes())
    return offset


def write_t5_index(root: Path, layout: dict[str, Layout]) -> None:
    weight_map = {key: Path(f).name for f in T5_FILES for key in layout[f]}
    total = sum(_numel(s) * 2 for f in T5_FILES for s in layout[f].values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "text_encoder_2" / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _clip_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table, which CLIP's byte-level BPE is built on."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_clip_tokenizer(folder: Path) -> None:
    """A small byte-level BPE (ids far below 49408) in the hub's file layout."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _clip_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab |= {c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)}
    merges = []
    for pair in ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd"):
        merges.append(f"{pair[0]} {pair[1]}</w>")
        vocab[pair + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_t5_tokenizer(folder: Path) -> None:
    """A small unigram vocabulary (ids far below 32128) saved by ``T5TokenizerFast`` itself."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.printable if not c.isspace()]
    pieces += [("▁" + c, -2.5) for c in string.ascii_letters + string.digits]
    T5TokenizerFast(vocab=pieces, extra_ids=100).save_pretrained(str(folder))


def make(outdir: Path, parts: tuple[str, ...] = PARTS, std: float = 0.02) -> Path:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = outdir / REPO_DIR
    layout = flux_layout()
    for part in parts:
        if part == "tokenizers":
            write_clip_tokenizer(root / "tokenizer")
            write_t5_tokenizer(root / "tokenizer_2")
            continue
        for rel in files_of(part):
            started = time.monotonic()
            size = write_weights(root / rel, layout[rel], std, device)
            print(f"{rel}: {size / 1e9:.2f} GB in {time.monotonic() - started:.1f} s ({device})",
                  flush=True)
        if part == "t5":
            write_t5_index(root, layout)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to write (default: all of {','.join(PARTS)})")
    parser.add_argument("--std", type=float, default=0.02, help="standard deviation of the values")
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.only.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    root = make(args.outdir, parts, args.std)
    print(f"random FLUX.1-dev checkpoint written under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
