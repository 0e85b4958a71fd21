"""Where a streamed step's time goes, read off a torch.profiler (Kineto) chrome trace.

    python bench/trace_timeline.py trace.json[.gz]

For each window between two ``cudaDeviceSynchronize`` calls (the engine syncs after every
denoising step, so the middle windows are whole steps) it prints:
- the compute stream's busy time and its idle time, split by what the next kernel waited for:
  ``cpu`` (its launch call ended after the previous kernel: the host was late), ``copy`` (a
  host-to-device copy ended just before it started: it waited for a streamed block) and
  ``other``;
- the copy stream's busy time, bytes and bandwidth (bytes / time copying);
- the time inside the streamer's casts (``stream.cast`` annotations, when the run added them);
- how long the step's closing sync waited (near zero: the host, not the GPU, set the pace).
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

COPY_WAIT_US = 60.0  # a kernel starting this soon after a copy ended waited for that copy
GAP_US = 5.0  # idle stretches shorter than this are launch spacing, not waiting


def load_trace(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _clip(spans: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    return [(max(a, lo), min(b, hi)) for a, b in spans if b > lo and a < hi]


def step_windows(events: list[dict[str, Any]]) -> list[tuple[float, float, float]]:
    """(start, end, sync wait µs) between the ends of consecutive device syncs on the host."""
    syncs = sorted((e["ts"], e["ts"] + e.get("dur", 0.0)) for e in events
                   if e.get("ph") == "X" and e.get("name") == "cudaDeviceSynchronize")
    return [(a_end, b_end, b_end - b_start)
            for (_, a_end), (b_start, b_end) in zip(syncs, syncs[1:], strict=False)]


def analyse(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    xs = [e for e in events if e.get("ph") == "X"]
    kernels = [e for e in xs if e.get("cat") == "kernel"]
    copies = [e for e in xs if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    launches = {e["args"]["correlation"]: e["ts"] + e["dur"] for e in xs
                if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    casts = [(e["ts"], e["ts"] + e["dur"]) for e in xs
             if e.get("cat") == "gpu_user_annotation" and e.get("name") == "stream.cast"]
    by_stream: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for k in kernels:
        by_stream[k["args"].get("stream")].append(k)
    if not by_stream:
        return []
    compute = max(by_stream.values(), key=len)
    compute.sort(key=lambda k: k["ts"])
    copy_ends = sorted(c["ts"] + c["dur"] for c in copies)
    rows = []
    for lo, hi, sync_wait in step_windows(events):
        ks = [k for k in compute if lo <= k["ts"] < hi]
        if not ks:
            continue
        idle = {"cpu": 0.0, "copy": 0.0, "other": 0.0}
        for prev, nxt in zip(ks, ks[1:], strict=False):
            prev_end = prev["ts"] + prev["dur"]
            gap = nxt["ts"] - prev_end
            if gap <= GAP_US:
                continue
            launched = launches.get(nxt["args"].get("correlation"), 0.0)
            late = min(gap, max(0.0, launched - prev_end))
            idle["cpu"] += late
            rest = gap - late
            if rest > 0 and any(prev_end <= c <= nxt["ts"] and nxt["ts"] - c <= COPY_WAIT_US
                                for c in _near(copy_ends, prev_end, nxt["ts"])):
                idle["copy"] += rest
            else:
                idle["other"] += rest
        first_gap = ks[0]["ts"] - lo  # the host's time from the sync to the first kernel
        cs = _clip([(c["ts"], c["ts"] + c["dur"]) for c in copies], lo, hi)
        nbytes = sum(c["args"].get("bytes", 0) for c in copies if lo <= c["ts"] < hi)
        copy_busy = _union(cs)
        rows.append({
            "window_ms": (hi - lo) / 1e3,
            "compute_busy_ms": _union([(k["ts"], k["ts"] + k["dur"]) for k in ks]) / 1e3,
            "idle_cpu_ms": idle["cpu"] / 1e3, "idle_copy_ms": idle["copy"] / 1e3,
            "idle_other_ms": idle["other"] / 1e3, "first_kernel_ms": first_gap / 1e3,
            "copy_busy_ms": copy_busy / 1e3, "copy_gb": nbytes / 1e9,
            "copy_gbs": nbytes / copy_busy / 1e3 if copy_busy else 0.0,
            "cast_ms": _union(_clip(casts, lo, hi)) / 1e3,
            "sync_wait_ms": sync_wait / 1e3, "kernels": len(ks)})
    return rows


def _near(sorted_ends: list[float], lo: float, hi: float) -> list[float]:
    import bisect

    return sorted_ends[bisect.bisect_left(sorted_ends, lo):bisect.bisect_right(sorted_ends, hi)]


COLUMNS = ("window_ms", "compute_busy_ms", "idle_cpu_ms", "idle_copy_ms", "idle_other_ms",
           "first_kernel_ms", "copy_busy_ms", "copy_gb", "copy_gbs", "cast_ms", "sync_wait_ms",
           "kernels")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                                       for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows = analyse(load_trace(Path(argv[1])))
    print(table(rows))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
