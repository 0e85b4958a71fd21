"""bench/trace_timeline.py reads a kernel trace the way torch.profiler (Kineto) writes it: a
synthetic step whose idle time is known, split by what the compute stream waited for."""

from __future__ import annotations

import gzip
import json

from bench.trace_timeline import analyse, load_trace, main


def step_trace() -> list[dict]:
    events: list[dict] = []

    def add(name: str, cat: str, ts: float, dur: float, **args) -> None:
        events.append({"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "args": args})

    add("cudaDeviceSynchronize", "cuda_runtime", 0, 10)  # the previous step's end
    add("cudaLaunchKernel", "cuda_runtime", 12, 2, correlation=1)
    add("gemm", "kernel", 20, 100, stream=7, correlation=1)
    add("cudaMemcpyAsync", "cuda_runtime", 13, 2, correlation=2)
    add("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy", 20, 150, stream=9, correlation=2,
        bytes=1_500_000)
    add("cuLaunchKernel", "cuda_driver", 15, 2, correlation=3)  # launched early: waits on the copy
    add("cast", "kernel", 180, 50, stream=7, correlation=3)
    add("stream.cast", "gpu_user_annotation", 180, 50)
    add("cudaLaunchKernel", "cuda_runtime", 300, 2, correlation=4)  # launched late: the host
    add("norm", "kernel", 305, 20, stream=7, correlation=4)
    add("cudaDeviceSynchronize", "cuda_runtime", 310, 20)  # this step's end, 15 µs waiting
    return events


def test_a_step_s_idle_time_is_split_by_what_the_gpu_waited_for(tmp_path):
    (row,) = analyse(step_trace())
    assert row["kernels"] == 3
    assert row["window_ms"] == 0.32 and row["first_kernel_ms"] == 0.01
    assert row["compute_busy_ms"] == 0.17
    assert row["idle_copy_ms"] == 0.06  # 120 -> 180: the copy ended at 170
    assert abs(row["idle_cpu_ms"] - 0.072) < 1e-9  # 230 -> 302: launched at 302
    assert abs(row["idle_other_ms"] - 0.003) < 1e-9
    assert row["copy_gbs"] == 10.0 and row["cast_ms"] == 0.05 and row["sync_wait_ms"] == 0.02
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": step_trace()}, f)
    assert analyse(load_trace(path)) == [row]
    assert main(["trace_timeline", str(path)]) == 0
