"""The NSFW check's cost per image on the CPU (``[moderation]``; docs/benchmarks.md).

    python -m bench.bench_nsfw [--runs 20] [--size 1024]

Images made here (no model, no GPU): flat colours, a skin-tone gradient and noise, PNG-encoded
as the bot encodes its results. Each is checked ``runs`` times through ``Moderator.check`` (PNG
decode + NudeNet's 320n ONNX model on onnxruntime's CPU provider, as the bot runs it); the table
gives the median wall time and the CPU time (all threads) per image. Needs ``.[nsfw]``.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time

import numpy as np
from PIL import Image

from engine.config import Config
from engine.moderation import Moderator, load_nudenet


def images(size: int) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)[None, :, None]
    skin = (np.array([224, 172, 140]) * (0.6 + 0.4 * ramp)).repeat(size, 0).astype(np.uint8)
    made = {
        "flat grey": Image.new("RGB", (size, size), (128, 128, 128)),
        "skin-tone gradient": Image.fromarray(skin),
        "noise": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
    }
    out = {}
    for name, image in made.items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out[name] = buffer.getvalue()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    started = time.perf_counter()
    section = Config().moderation
    moderator = Moderator(section, load_nudenet())
    print(f"NudeNet loaded in {time.perf_counter() - started:.2f} s; {os.cpu_count()} CPU "
          f"cores ({platform.processor() or platform.machine()}); {args.runs} runs per image")
    print(f"\n| image ({args.size}²) | PNG KB | wall ms/image (median) | CPU ms/image (median) "
          "| flagged |")
    print("|---|---|---|---|---|")
    for name, png in images(args.size).items():
        moderator.check(png)  # warm-up: the first run allocates onnxruntime's buffers
        walls, cpus = [], []
        for _ in range(args.runs):
            cpu = time.process_time()
            verdict = moderator.check(png)
            cpus.append(time.process_time() - cpu)
            walls.append(verdict.seconds)
        print(f"| {name} | {len(png) // 1024} | {statistics.median(walls) * 1000:.1f} | "
              f"{statistics.median(cpus) * 1000:.1f} | {verdict.flagged} |")


if __name__ == "__main__":
    main()
