"""LoRA styles on the GPU (issue 13 item 1): s/step with no style and with random LoRAs of rank
16 and 64 in a real FLUX layout, and the time to switch styles, on the streamed float8 DiT.

A FluxDiT with random float8 weights is built in memory (``bench_streaming.random_flux_dit``),
laid out by the block streamer as the engine plans it under each cap (an emulated card:
``torch.cuda.set_per_process_memory_fraction``; 0 = uncapped), with the largest LoRA's bytes
set aside as the engine's plan does (``DeviceBudget.lora_gib``). Each style's LoRA goes
through ``engine/flux/lora.py`` exactly as the backend uses it (read_lora, LoraBranches).

    python3 bench/bench_lora.py --caps 0,8 --ranks 16,64 --format diffusers --steps 8 \
        --compile --json $OUT/lora.json

Issue 13's targets: a switch <= 0.5 s; a style <= 10% per step at 8 GB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_streaming import (  # noqa: E402
    denoise,
    engine_plan,
    flux_inputs,
    random_flux_dit,
    set_cap,
)
from bench.make_random_lora import write_lora  # noqa: E402
from engine.flux.lora import LoraBranches, LoraWeights, read_lora  # noqa: E402
from engine.flux.pipeline import compile_dit_blocks  # noqa: E402
from engine.flux.residency import GIB  # noqa: E402
from engine.flux.streaming import enable_block_streaming  # noqa: E402


def step_time(dit: torch.nn.Module, size: int, steps: int) -> float:
    times: list[float] = []
    denoise(dit, flux_inputs(size, size), steps, times)
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


def run_cap(cap: float, styles: dict[str, LoraWeights], args: argparse.Namespace
            ) -> list[dict[str, Any]]:
    dit = random_flux_dit()
    lora_bytes = max(w.nbytes for w in styles.values())
    budget = set_cap(cap) - lora_bytes  # the plan keeps room for the largest style
    plan = engine_plan(dit, budget)
    handle = enable_block_streaming(dit, plan, "cuda")
    branches = LoraBranches.attach(dit, {n for w in styles.values() for n in w.pairs})
    if args.compile:
        compile_dit_blocks(dit)
    rows = []
    try:
        base = step_time(dit, args.size, args.steps)
        rows.append({"cap_gib": cap, "style": "none", "s_per_step": base,
                     "plan": plan.describe()})
        print(json.dumps(rows[-1]), flush=True)
        for name, weights in styles.items():
            torch.cuda.synchronize()
            started = time.perf_counter()
            branches.apply(weights, 0.8, "cuda")
            torch.cuda.synchronize()
            switch = time.perf_counter() - started
            try:
                per_step = step_time(dit, args.size, args.steps)
                peak = torch.cuda.max_memory_allocated() / GIB
            finally:
                branches.clear()
            rows.append({"cap_gib": cap, "style": name, "s_per_step": per_step,
                         "vs_none": per_step / base - 1, "switch_s": switch,
                         "lora_gib": weights.nbytes / GIB, "peak_alloc_gib": peak})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        branches.detach()
        handle.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", default="0,8", help="GiB per emulated card; 0 = uncapped")
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="loras-"))
    styles = {}
    for rank in (int(r) for r in args.ranks.split(",")):
        path = write_lora(folder / f"rank{rank}.safetensors", rank, args.format)
        started = time.perf_counter()
        styles[f"rank{rank}"] = read_lora(str(path))
        print(f"rank {rank}: read and converted in {time.perf_counter() - started:.1f} s, "
              f"{styles[f'rank{rank}'].nbytes / GIB:.2f} GiB", flush=True)
    rows = [row for cap in (float(c) for c in args.caps.split(",")) for row in
            run_cap(cap, styles, args)]
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                         "format": args.format, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
