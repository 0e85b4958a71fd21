"""Benchmark the FLUX backend against the seed's diffsynth set-up, on a random-weight checkpoint.

    python bench/bench_engine.py --ckpt DIR [--rows SPEC ...] [--md docs/benchmarks.md] [--json F]

A row SPEC is ``setup:cap:sizes:steps`` (``ours-low:12:1024,512:20``); cap 0 = uncapped, and a
capped row also runs with ``set_per_process_memory_fraction`` at the cap (an emulated card).
Setups: ``ours-<preset>`` (our FluxBackend, preset low|balanced|max|auto, vram_limit_gib = cap),
``baseline-low`` (plain diffsynth, the seed's set-up: DiT float8 on the CPU with the vram_config of
diffsynth's low-VRAM FLUX example, text encoders and VAE bf16 on the CPU, vram_limit = cap) and
``baseline-resident`` (plain diffsynth, everything bf16 on the GPU). Append ``+engine`` to an ours
setup to also time the same job through the Engine (queue, worker thread, events), ``+compile``
for ``model.compile`` (its start-up cost is reported as compile s) and ``+fp8`` for
``model.float8_compute`` (``ours-max+compile+fp8:0:1024:20``).

Each row runs in its own process (clean GPU state, its own host peak RSS). A separate process
measures the floors' rates: the bf16 matmul rate and pinned host->device bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_report  # noqa: E402
from bench.bench_measure import run_floors, run_row  # noqa: E402

DEFAULT_ROWS = [
    "baseline-resident:0:1024:20",
    "ours-max+engine:0:1024,512:20",
    "baseline-low:12:1024:5",
    "ours-low:12:1024,512:5",
    "ours-low:8:1024,512:5",
    "ours-balanced:0:1024,512:20",
    "ours-auto:16:1024,512:20",
]


def run_child(args: list[str], timeout: float) -> tuple[list[dict], str]:
    """Run this script in a child process; collect its ``RESULT {json}`` lines."""
    command = [sys.executable, __file__, *args]
    started = time.monotonic()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return _results(out), f"timed out after {timeout:.0f} s"
    out = proc.stdout
    results = _results(out)
    error = "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
    sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "")
    print(f"  ({' '.join(args[:2])}: {time.monotonic() - started:.0f} s)", flush=True)
    return results, error


def _results(out: str) -> list[dict]:
    return [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]


def parent(args: argparse.Namespace) -> int:
    floors, err = run_child(["--floors"], timeout=120)
    rate = floors[0] if floors else {}
    print(f"floors: {rate or err}", flush=True)
    rows: list[dict] = []
    deadline = time.monotonic() + args.budget_s
    for spec in args.rows:
        left = deadline - time.monotonic()
        if left < 30:
            rows.append({"spec": spec, "error": "skipped: out of time"})
            continue
        print(f"row {spec}", flush=True)
        results, err = run_child(["--one", spec, "--ckpt", str(args.ckpt)], timeout=left)
        rows.extend(results or [{"spec": spec, "error": err or "no result"}])
        if err and results:
            rows.append({"spec": spec, "error": err})
        for r in results:
            print("  " + bench_report.one_line(r), flush=True)
    table = bench_report.markdown(rows, rate, command=" ".join(sys.argv))
    print(table)
    if args.md:
        Path(args.md).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"floors": rate, "rows": rows}, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, help="folder made by bench/make_random_flux.py")
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS)
    parser.add_argument("--md", help="write the markdown report here")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_BUDGET_S", 540)))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--floors", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floors:
        print("RESULT " + json.dumps(run_floors()), flush=True)
        return 0
    if args.one:
        for result in run_row(args.one, args.ckpt):
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.ckpt is None:
        parser.error("--ckpt is required")
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
