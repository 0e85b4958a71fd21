"""The nearest peer on the same emulated cards: diffusers' best offloading of the FLUX transformer.

    python bench/bench_peer_diffusers.py --cards 5.6 7.5 11.5 [--steps 6] [--json F]

diffusers 0.42's ``FluxTransformer2DModel`` with FLUX.1-dev's shape and random weights, every
block linear stored in float8 (``apply_layerwise_casting``, computed in bf16) and group offload at
block level on a side stream (``enable_group_offload(block_level, num_blocks_per_group=1,
use_stream=True, record_stream=True)``): the fastest way diffusers offers to run a 12B
transformer on a small card. Timed per denoising step (one transformer call at 1024², the text
and VAE phases not included, which only favours the peer), after two warm-up calls, on a card
emulated by ``emulated_card.EmulatedCard`` (sized for what the peer's process holds already, its
CUDA context and the pinned weights' bookkeeping, so that it sees the card's free memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.emulated_card import EmulatedCard  # noqa: E402

GIB = 1024**3
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# Embedders, the final norm and projection stay bf16; every linear inside the blocks (their
# modulation linears included, which diffusers' own "norm" pattern would skip) is float8.
KEEP_BF16 = ("pos_embed", r"^x_embedder", r"^context_embedder", r"^time_text_embed",
             r"^norm_out", r"^proj_out")


def build() -> Any:
    import torch
    from diffusers import FluxTransformer2DModel
    from diffusers.hooks import apply_layerwise_casting

    started = time.perf_counter()

    def phase(name: str) -> None:  # the run that timed out said nothing of where time went
        print(f"peer set-up: {name} at {time.perf_counter() - started:.1f} s", flush=True)

    # built on the meta device in bf16 and given memory once: FluxTransformer2DModel's own
    # initialisation (and a float32 copy) of 12B parameters took minutes on the CPU
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    phase("allocated on the CPU")
    fill_random(model.parameters())
    model.eval().requires_grad_(False)
    phase(f"random weights ({torch.get_num_threads()} threads)")
    apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn,
                            compute_dtype=torch.bfloat16, skip_modules_pattern=KEEP_BF16,
                            non_blocking=True)
    phase("float8 storage")
    model.enable_group_offload(onload_device=torch.device("cuda"), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=True, record_stream=True)
    phase("group offload")
    return model


def fill_random(params: Any, pool_numel: int = 1 << 24) -> None:
    """Random weights at copy speed: every parameter is a slice of one pool of N(0, 0.02)
    values, offset per parameter (the step time does not depend on the values)."""
    import torch

    pool = torch.randn(pool_numel, generator=torch.Generator().manual_seed(0)).mul_(0.02)
    pool = pool.to(torch.bfloat16).repeat(2)
    with torch.no_grad():
        for index, p in enumerate(params):
            flat, start = p.view(-1), (index * 7919) % pool_numel
            for at in range(0, flat.numel(), pool_numel):
                part = flat[at:at + pool_numel]
                part.copy_(pool[start:start + part.numel()])


def inputs(size: int = 1024, text: int = 512) -> dict[str, Any]:
    import torch

    tokens = (size // 16) ** 2
    g = torch.Generator().manual_seed(0)
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    ids = torch.zeros(tokens, 3)
    side = size // 16
    ids[:, 1] = torch.arange(side).repeat_interleave(side)
    ids[:, 2] = torch.arange(side).repeat(side)
    return dict(hidden_states=torch.randn(1, tokens, 64, generator=g).to(**cuda),
                encoder_hidden_states=torch.randn(1, text, 4096, generator=g).to(**cuda),
                pooled_projections=torch.randn(1, 768, generator=g).to(**cuda),
                timestep=torch.tensor([0.5], **cuda), guidance=torch.tensor([3.5], **cuda),
                img_ids=ids.to(**cuda), txt_ids=torch.zeros(text, 3, **cuda), return_dict=False)


def time_steps(model: Any, steps: int) -> list[float]:
    import torch

    x = inputs()
    times = []
    with torch.no_grad():
        for step in range(steps + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            print(f"peer step {step + 1}: {times[-1]:.3f} s", flush=True)
    return times[2:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cards", type=float, nargs="*", default=[5.6, 7.5, 11.5])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    started = time.perf_counter()
    model = build()
    build_s = time.perf_counter() - started
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    ours_now = torch.cuda.memory_reserved()
    rows = []
    for card in args.cards:
        torch.cuda.empty_cache()
        row: dict[str, Any] = {"card_free_gib": card, "setup": "diffusers group offload + fp8",
                               "build_s": build_s}
        # this process's context and kernels are held already: the card's free memory is what
        # the holder leaves, counted from here (a real card would show the same free figure
        # to a process that had started)
        try:
            with EmulatedCard(card) as held:
                torch.cuda.reset_peak_memory_stats()
                times = time_steps(model, args.steps)
                report = held.report()
            row.update(s_step=statistics.median(times), steps_timed=len(times),
                       device_peak_gib=report["peak_gib"],
                       free_at_start_gib=report["free_at_hold_gib"],
                       peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
        except Exception as e:  # noqa: BLE001 - an OOM on a small card is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(), "total_gib": total / GIB,
              "free_before_gib": free / GIB, "reserved_before_gib": ours_now / GIB, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
