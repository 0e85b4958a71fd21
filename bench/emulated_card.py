"""Emulate a smaller GPU: another process holds all of the device's memory but ``free_gib``.

    with EmulatedCard(free_gib=7.5) as card:   # returns once the holder holds its share
        ... run the product unchanged (python -m bot run, a backend, a test) ...
        card.report()   # {"peak_gib": what everyone else held at most, as the driver saw it, ...}

Why not ``torch.cuda.set_per_process_memory_fraction``: it caps PyTorch's caching allocator
alone, while the CUDA context, cuBLAS/cuDNN workspaces, compiled kernels and the allocator's
fragmentation still find the rest of an 80 GB GPU free. A real 8 GB card has nothing outside.
Here the product sees exactly the free memory of the emulated card, and everything it holds on
the device, whatever holds it, comes out of that.

The holder samples the device's free memory (``cudaMemGetInfo``) every few milliseconds; the
lowest free figure since the last reset gives the peak of the other processes (the product),
as the driver sees it. ``nvidia_smi_used_gib`` adds nvidia-smi's per-process figures where the
machine shows them.

    python bench/emulated_card.py --free-gib 7.5   # the holder itself (stdin: reset, report)

``free_gib`` 0 (or less) holds nothing: the whole card, uncapped, with its peak still sampled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

GIB = 1024**3
MIB = 1024**2
SAMPLE_S = 0.002


class EmulatedCard:
    def __init__(self, free_gib: float, device: int = 0) -> None:
        self.free_gib, self.device = free_gib, device
        self._proc: subprocess.Popen[str] | None = None
        self.held: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> EmulatedCard:
        command = [sys.executable, __file__, "--free-gib", str(self.free_gib),
                   "--device", str(self.device)]
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, bufsize=1)
        line = self._proc.stdout.readline() if self._proc.stdout else ""
        if not line.startswith("HOLDING "):
            self.__exit__()
            raise RuntimeError(f"the memory holder did not start: {line!r}")
        self.held = json.loads(line[len("HOLDING "):])
        return self

    def _ask(self, word: str) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        with self._lock:
            self._proc.stdin.write(word + "\n")
            self._proc.stdin.flush()
            return json.loads(self._proc.stdout.readline())

    def reset(self) -> None:
        """Start a new peak (between rows)."""
        self._ask("reset")

    def report(self) -> dict[str, Any]:
        """``peak_gib``: the most the other processes held on the device since the last reset;
        ``now_gib``: what they hold now; ``free_at_hold_gib``: the emulated card's free memory."""
        return self._ask("report")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            if self._proc.stdin:
                self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None


def nvidia_smi_used_gib(pid: int) -> float | None:
    """nvidia-smi's figure for one process (None where it lists no processes, as in some
    containers)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return float(parts[1]) * MIB / GIB
    return None


# -- the holder process -------------------------------------------------------------------------
def hold(free_gib: float, device: int) -> None:
    import torch

    torch.cuda.set_device(device)
    chunks = []
    free, total = torch.cuda.mem_get_info()
    target = int(free_gib * GIB) if free_gib > 0 else free  # 0: the whole card
    step = 1024 * MIB
    while free > target:
        size = min(step, free - target)
        if size < 2 * MIB:
            break
        try:
            chunks.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            step //= 2
            if step < 2 * MIB:
                break
        free, _ = torch.cuda.mem_get_info()
    state = {"free_at_hold": free, "min_free": free, "samples": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now, _ = torch.cuda.mem_get_info()
            with lock:
                state["min_free"] = min(state["min_free"], now)
                state["now_free"] = now
                state["samples"] += 1
            time.sleep(SAMPLE_S)

    threading.Thread(target=sample, daemon=True).start()
    print("HOLDING " + json.dumps({"free_at_hold_gib": free / GIB, "total_gib": total / GIB,
                                   "held_gib": sum(c.numel() for c in chunks) / GIB}),
          flush=True)
    for line in sys.stdin:
        word = line.strip()
        with lock:
            if word == "reset":
                state["min_free"] = state.get("now_free", free)
                reply: dict[str, Any] = {"ok": True}
            else:
                reply = {"peak_gib": (state["free_at_hold"] - state["min_free"]) / GIB,
                         "now_gib": (state["free_at_hold"] - state.get("now_free", free)) / GIB,
                         "free_at_hold_gib": state["free_at_hold"] / GIB,
                         "samples": state["samples"]}
        print(json.dumps(reply), flush=True)
    stop.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--free-gib", type=float, required=True)
    parser.add_argument("--device", type=int, default=int(os.environ.get("CARD_DEVICE", 0)))
    args = parser.parse_args()
    hold(args.free_gib, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
