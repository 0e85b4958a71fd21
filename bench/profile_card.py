"""Where a step's time goes on an emulated card: the FLUX backend with the default config, one
image per size with per-step times, the allocator's retries and device (un)maps, torch.compile's
recompiles, and a profile of one step's kernels and CPU ops.

    python bench/profile_card.py --ckpt DIR --card 7.5 [--sizes 1024 512] [--steps 4] [--json F]
        [--variants nosync nocast nocopy stream+2 resident+1] [--trace F.json.gz]

Variants run the same 1024² image again after changing one thing at run time, so that their
s/step differ from the default's by that alone: ``nosync`` (no device sync after each step),
``nocast`` / ``nocopy`` (the streamer skips its float8 casts / its host-to-device copies: the
images are wrong, the time is what the step costs without them), ``stream+N`` (N more blocks
streamed, the smallest resident ones) and ``resident+N`` (N fewer, where the card has room).
The trace's timeline is summarised by ``bench/trace_timeline.py``.

Set PYTORCH_CUDA_ALLOC_CONF to compare allocator settings (the backend leaves it as given).
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


def annotate_streamer() -> None:
    """Name the streamer's casts and copies in the profile (``stream.cast``/``stream.copy``)."""
    from torch.profiler import record_function

    from engine.flux.streaming import StreamingHandle

    for name in ("_cast", "_copy"):
        plain = getattr(StreamingHandle, name)

        def named(self: Any, *args: Any, _plain: Any = plain, _n: str = name[1:]) -> None:
            with record_function(f"stream.{_n}"):
                _plain(self, *args)

        setattr(StreamingHandle, name, named)


def profile_step(torch: Any, backend: Any, size: int, trace: Path | None) -> str:
    from torch.profiler import ProfilerActivity, profile

    from bench.trace_timeline import analyse, load_trace
    from bench.trace_timeline import table as timeline_table

    annotate_streamer()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        backend.generate(request(size, 5, seed=5), lambda i, n: None)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    table += "\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    raw = Path("/tmp/profile-trace.json")
    prof.export_chrome_trace(str(raw))
    table += "\n" + timeline_table(analyse(load_trace(raw)))
    if trace is not None:
        import gzip
        import shutil

        with raw.open("rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return table


def run_variant(torch: Any, backend: Any, name: str, steps: int) -> dict[str, Any]:
    """One 1024² image with one thing changed (see the module docstring), then undone."""
    import contextlib

    from engine.flux import pipeline
    from engine.flux.residency import FP8, STREAMED, ResidencyPlan
    from engine.flux.streaming import StreamingHandle

    stream = backend._stream
    undo: list[Any] = []
    if name == "nosync":
        plain = pipeline.step_reporter
        pipeline.step_reporter = lambda on_step, sync=None: plain(on_step, None)
        undo.append(lambda: setattr(pipeline, "step_reporter", plain))
    elif name in ("nocast", "nocopy"):
        attr = "_cast" if name == "nocast" else "_copy"
        plain = getattr(StreamingHandle, attr)

        def skip(self: Any, block: Any, where: Any) -> None:
            if name == "nocopy" and self._cuda:  # keep the events the compute stream waits on
                with torch.cuda.stream(self._side):
                    self._copied[where].record(self._side)

        setattr(StreamingHandle, attr, skip)
        undo.append(lambda: setattr(StreamingHandle, attr, plain))
    elif name.startswith(("stream+", "resident+")) and stream is not None:
        n = int(name.split("+")[1])
        old = stream.plan
        places = list(old.placements)
        src, dst = (FP8, STREAMED) if name.startswith("stream") else (STREAMED, FP8)
        pick = sorted((i for i, p in enumerate(places) if p == src),
                      key=lambda i: (old.block_bytes[i], i))[:n]
        for i in pick:
            places[i] = dst
        stream.relayout(ResidencyPlan(**{**old.__dict__, "placements": tuple(places)}))
        undo.append(lambda: stream.relayout(old))
    try:
        row = one_image(torch, backend, 1024, steps)
    except torch.cuda.OutOfMemoryError as e:
        row = {"error": str(e)[:200]}
        backend.recover_after_failure()
    finally:
        for u in undo:
            with contextlib.suppress(Exception):
                u()
    row["variant"] = name
    row["s_step"] = statistics.median_high(row.get("steps_s") or [0.0])
    if stream is not None:
        row["streamed_gib"] = stream.plan.streamed_bytes / 1024**3
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--card", type=float, default=7.5)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 512])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--compile", type=int, default=1)
    parser.add_argument("--profile", type=int, default=1024, help="0: no profile")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--variants", nargs="*", default=[])
    parser.add_argument("--variant-steps", type=int, default=10)
    parser.add_argument("--trace", type=Path, help="the profile's chrome trace (gzip)")
    parser.add_argument("--options", nargs="*", default=[],
                        help="[model] options as KEY=true|false, e.g. park_models=true")
    args = parser.parse_args()
    with EmulatedCard(args.card) as card:
        import torch

        from engine.config import LimitsSection, ModelSection
        from engine.flux.backend import FluxBackend

        options = {k: v.lower() == "true" for k, v in (o.split("=", 1) for o in args.options)}
        config = ModelSection(models_dir=str(args.ckpt), offline=True,
                              dit_path=checkpoint_paths(args.ckpt)["dit"],
                              compile=bool(args.compile), **options)
        # planned as the bot plans with the default [limits] (engine/backends/__init__.py), so
        # the profile is of the plan the bot would run on this card
        limits = LimitsSection()
        backend = FluxBackend(config, max_pixels=limits.max_pixels, max_images=limits.images_max)
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
        result["variants"] = []
        for name in ["default", *args.variants, "default"]:
            row = run_variant(torch, backend, name, args.variant_steps)
            result["variants"].append(row)
            print(json.dumps({k: row[k] for k in ("variant", "s_step", "s_image",
                                                  "streamed_gib", "error") if k in row}),
                  flush=True)
        if args.profile:
            result["profile"] = profile_step(torch, backend, args.profile, args.trace)
            print(result["profile"], flush=True)
        result["card_report"] = card.report()
        backend.close()
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
