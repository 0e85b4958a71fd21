"""Random-weight FLUX LoRA files in the key layouts real ones use, for tests and benchmarks.

    python bench/make_random_lora.py out.safetensors --rank 16 --format kohya [--std 0]

``diffusers``: ``transformer.transformer_blocks.N.attn.to_q.lora_A.weight`` (q, k, v separate,
as diffusers/PEFT trainers write them); ``kohya``: ``lora_unet_double_blocks_N_img_attn_qkv
.lora_down.weight`` with an ``.alpha`` per layer (kohya sd-scripts, ai-toolkit's ComfyUI export).
Every linear layer of every block is targeted (FLUX.1-dev: dim 3072, 19 + 38 blocks).
``std`` 0 gives a LoRA of zeros: applied, it must leave the image exactly as it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

# diffusers name -> (in, out) as multiples of dim; double blocks, then single blocks
_DIFFUSERS_DOUBLE = {
    "attn.to_q": (1, 1), "attn.to_k": (1, 1), "attn.to_v": (1, 1), "attn.to_out.0": (1, 1),
    "attn.add_q_proj": (1, 1), "attn.add_k_proj": (1, 1), "attn.add_v_proj": (1, 1),
    "attn.to_add_out": (1, 1), "ff.net.0.proj": (1, 4), "ff.net.2": (4, 1),
    "ff_context.net.0.proj": (1, 4), "ff_context.net.2": (4, 1), "norm1.linear": (1, 6),
    "norm1_context.linear": (1, 6)}
_DIFFUSERS_SINGLE = {"attn.to_q": (1, 1), "attn.to_k": (1, 1), "attn.to_v": (1, 1),
                     "proj_mlp": (1, 4), "proj_out": (5, 1), "norm.linear": (1, 3)}
_KOHYA_DOUBLE = {f"{s}_{n}": shape for s in ("img", "txt") for n, shape in (
    ("attn_qkv", (1, 3)), ("attn_proj", (1, 1)), ("mlp_0", (1, 4)), ("mlp_2", (4, 1)),
    ("mod_lin", (1, 6)))}
_KOHYA_SINGLE = {"linear1": (1, 7), "linear2": (5, 1), "modulation_lin": (1, 3)}

# format -> (double-block prefix, single-block prefix, double layers, single layers)
_LAYOUTS: dict[str, tuple] = {
    "diffusers": ("transformer.transformer_blocks.{}.", "transformer.single_transformer_blocks.{}.",
                  _DIFFUSERS_DOUBLE, _DIFFUSERS_SINGLE),
    "kohya": ("lora_unet_double_blocks_{}_", "lora_unet_single_blocks_{}_", _KOHYA_DOUBLE,
              _KOHYA_SINGLE)}


def lora_state_dict(rank: int, fmt: str = "diffusers", dim: int = 3072, double: int = 19,
                    single: int = 38, std: float = 0.02, alpha: float | None = None,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LoRA (A and B both random, so it changes the output) in ``fmt``."""
    g = torch.Generator().manual_seed(seed)

    def pair(prefix: str, down: str, up: str, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        fan_in, fan_out = shape[0] * dim, shape[1] * dim
        out = {f"{prefix}.{down}.weight": torch.randn(rank, fan_in, generator=g) * std,
               f"{prefix}.{up}.weight": torch.randn(fan_out, rank, generator=g) * std}
        if alpha is not None:
            out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
        return out

    if fmt not in _LAYOUTS:
        raise ValueError(f"format must be diffusers or kohya, got {fmt!r}")
    tensors: dict[str, torch.Tensor] = {}
    for prefix, names, count in zip(_LAYOUTS[fmt][:2], _LAYOUTS[fmt][2:], (double, single),
                                    strict=True):
        down, up = ("lora_A", "lora_B") if fmt == "diffusers" else ("lora_down", "lora_up")
        for i in range(count):
            for name, shape in names.items():
                tensors |= pair(prefix.format(i) + name, down, up, shape)
    return {k: v.to(torch.bfloat16) if v.dim() else v for k, v in tensors.items()}


def write_lora(path: Path, rank: int, fmt: str = "diffusers", **kwargs: object) -> Path:
    from safetensors.torch import save_file

    save_file(lora_state_dict(rank, fmt, **kwargs), str(path))  # type: ignore[arg-type]
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers")
    parser.add_argument("--std", type=float, default=0.02, help="of A and B; 0: all zeros")
    args = parser.parse_args(argv)
    write_lora(args.out, args.rank, args.format, std=args.std)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
