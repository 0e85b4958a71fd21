"""Where a step's time goes on an emulated card: the FLUX backend with the default config, one
image per size with per-step times, the allocator's retries and device (un)maps, torch.compile's
recompiles, and a profile of one step's kernels and CPU ops.

    python bench/profile_card.py --ckpt DIR --card 7.5 [--sizes 1024 512] [--steps 4] [--json F]

Set PYTORCH_CUDA_ALLOC_CONF to compare allocator settings (the backend leaves it as given).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_measure import checkpoint_paths, request  # noqa: E402
from bench.emulated_card import EmulatedCard  # noqa: E402

STATS = ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free",
         "num_sync_all_streams")


def allocator_counts(torch: Any) -> dict[str, int]:
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in STATS}


def one_image(torch: Any, backend: Any, size: int, steps: int) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    ends: list[float] = []
    before = allocator_counts(torch)
    frames = dict(counters["stats"])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    backend.generate(request(size, steps, seed=3), lambda i, n: ends.append(time.perf_counter()))
    total = time.perf_counter() - t0
    after = allocator_counts(torch)
    return {"size": size, "s_image": total,
            "steps_s": [round(b - a, 4) for a, b in zip(ends, ends[1:], strict=False)],
            "allocator": {k: after[k] - before[k] for k in STATS},
            "dynamo": {k: v - frames.get(k, 0) for k, v in counters["stats"].items()
                       if v != frames.get(k, 0)}}


def profile_step(torch: Any, backend: Any, size: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        backend.generate(request(size, 2, seed=5), lambda i, n: None)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    return table + "\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--card", type=float, default=7.5)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 512])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--compile", type=int, default=1)
    parser.add_argument("--profile", type=int, default=1024, help="0: no profile")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with EmulatedCard(args.card) as card:
        import torch

        from engine.config import ModelSection
        from engine.flux.backend import FluxBackend

        config = ModelSection(models_dir=str(args.ckpt), offline=True,
                              dit_path=checkpoint_paths(args.ckpt)["dit"],
                              compile=bool(args.compile))
        backend = FluxBackend(config)
        t0 = time.perf_counter()
        backend.load()
        result: dict[str, Any] = {"card": args.card, "load_s": time.perf_counter() - t0,
                                  "plan": backend.plan.describe(),
                                  "calibration": backend.calibration,
                                  "streaming": backend._stream.plan.describe()
                                  if backend._stream else None, "images": []}
        for size in args.sizes:
            result["images"].append(one_image(torch, backend, size, args.steps))
            print(json.dumps(result["images"][-1]), flush=True)
        if args.profile:
            result["profile"] = profile_step(torch, backend, args.profile)
            print(result["profile"], flush=True)
        result["card_report"] = card.report()
        backend.close()
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
