"""The engine alone with a deep queue: jobs per second while 1,000+ wait against the last 1,000.

    .venv/bin/python -m bench.bench_queue [--jobs 2000] [--users 400] [--step-s 0.005]

No chat platform, no GPU: the dry-run backend (4 steps of ``--step-s``), the real engine, journal
and fair queue. What it measures is the engine's own cost per job as the line gets long (the fair
order, position announcements, the journal), the part of issue 11's "at 1,000 queued, 90% of an
empty queue's throughput" that is the engine's. ``bench/load_test.py --scenario queue-2000``
measures the same through the whole bot.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backends.dry_run import DryRunBackend  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.request import ImageRequest, Origin, User  # noqa: E402


async def measure(jobs: int, users: int, step_s: float) -> tuple[float, float]:
    """(jobs/s over the first half, while the line is deepest; jobs/s over the second half)."""
    folder = tempfile.mkdtemp(prefix="bench-queue-")
    config = Config()
    config.engine.backend = "dry-run"
    config.engine.database = f"{folder}/bot.sqlite3"
    config.engine.output_dir = f"{folder}/out"
    config.engine.max_queue_total = jobs + 1
    config.engine.max_queue_per_user = jobs // users + 1
    config.rate_limit.images_per_window = 0  # no limit
    async with Engine(config, DryRunBackend(step_s)) as engine:
        engine.pause()
        queued = [await engine.submit(User("discord", str(i % users)),
                                      ImageRequest("p", seed=i, steps=4, width=256, height=256,
                                                   guidance=3.5),
                                      Origin("discord", "1", str(i))) for i in range(jobs)]
        started = time.monotonic()
        engine.resume()
        half = jobs // 2
        for job in queued[:half]:
            await job.wait()
        middle = time.monotonic()
        for job in queued[half:]:
            await job.wait()
        ended = time.monotonic()
    return half / (middle - started), (jobs - half) / (ended - middle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_queue",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--step-s", type=float, default=0.005)
    args = parser.parse_args(argv)
    deep, short = asyncio.run(measure(args.jobs, args.users, args.step_s))
    print("| phase | jobs/s |\n|---|---|")
    print(f"| first {args.jobs // 2} (deep line) | {deep:.1f} |")
    print(f"| last {args.jobs - args.jobs // 2} | {short:.1f} |")
    print(f"\ndeep / short: {deep / short:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
