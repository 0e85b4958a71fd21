"""The FLUX DiT's arithmetic per denoising step, and the fastest an H100 could run it.

    python bench/dit_flops.py [--size 1024] [--images 1 4] [--peak-tflops 989]
                              [--measured docs/results/actions-h100-2026-12-07.json]

Counts the multiply-adds of one step from the checkpoint's own layout (``make_random_flux``):
every linear on the tokens it multiplies (a double block's image weights on the image tokens,
its text weights on the 512 text tokens, a single block's on both, and the modulations on the
one pooled vector), plus attention (QKᵀ and AV over all tokens in each of the 57 blocks). The floor is that arithmetic at the card's dense
bf16 peak (H100 SXM: 989 TFLOPS); ``--measured`` adds the s/step the bot logged for one image
and for ``--n 4`` in an actions run, and how much of the peak that is. Issue 12's ``--n 4``
target rests on this floor.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.make_random_flux import dit_layout  # noqa: E402

TEXT_TOKENS = 512  # T5's prompt length in FLUX.1-dev
PATCH = 16  # one token per 16×16 pixels (8× VAE, then 2×2 patches)
DIM, BLOCKS = 3072, 19 + 38
H100_SXM_BF16_TFLOPS = 989.0  # dense, no sparsity


def tokens_seen(key: str) -> str:
    """Which tokens a linear of the checkpoint multiplies: the image's, the prompt's, both, or
    the one pooled vector (timestep, guidance, CLIP) that the modulations read."""
    if "_mod.lin" in key or "modulation" in key or key.startswith(
            ("time_in", "guidance_in", "vector_in")):
        return "vector"
    if key.startswith("single_blocks."):
        return "all"
    if key.startswith("txt_in") or ".txt_" in key:
        return "text"
    return "image"  # img_in, a double block's image side, the final projection


def weights_by_tokens() -> dict[str, int]:
    """Weights of the DiT's linears by the tokens they multiply."""
    seen = {"image": 0, "text": 0, "all": 0, "vector": 0}
    for key, shape in dit_layout().items():
        if len(shape) == 2 and key.endswith(".weight"):
            seen[tokens_seen(key)] += math.prod(shape)
    return seen


def step_flops(size: int, images: int = 1) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one DiT step for ``images`` square images of ``size``²."""
    image_tokens = (size // PATCH) ** 2
    tokens = image_tokens + TEXT_TOKENS
    w = weights_by_tokens()
    linear = 2 * (w["image"] * image_tokens + w["text"] * TEXT_TOKENS + w["all"] * tokens
                  + w["vector"])
    attention = BLOCKS * 2 * 2 * tokens * tokens * DIM  # QKᵀ and AV
    return {"linear": images * linear, "attention": images * attention,
            "total": images * (linear + attention)}


def measured_steps(path: Path) -> dict[int, float]:
    """The fastest s/step an actions run logged for one image and for ``--n 4``."""
    best: dict[int, float] = {}
    for row in json.loads(path.read_text())["rows"]:
        for name, job in row["jobs"].items():
            n = 4 if name.startswith("--n 4") else 1 if name.startswith("one ") else 0
            if n and job.get("s_step"):
                best[n] = min(best.get(n, math.inf), job["s_step"])
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_TFLOPS)
    parser.add_argument("--measured", type=Path)
    args = parser.parse_args(argv)
    measured = measured_steps(args.measured) if args.measured else {}
    print("| images | TFLOP a step (linear + attention) | floor s/step at "
          f"{args.peak_tflops:g} TFLOPS | measured s/step | of the peak |")
    print("|---|---|---|---|---|")
    for n in args.images:
        flops = step_flops(args.size, n)
        floor = flops["total"] / (args.peak_tflops * 1e12)
        seen = measured.get(n)
        print(f"| {n} × {args.size}² | {flops['total'] / 1e12:.1f} ({flops['linear'] / 1e12:.1f} + "
              f"{flops['attention'] / 1e12:.1f}) | {floor:.3f} | "
              f"{f'{seen:.3f}' if seen else '–'} | {f'{floor / seen:.0%}' if seen else '–'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
