"""A stand-in for NudeNet at the detector's boundary (PNG bytes in, labels out).

The dry-run placeholders are not nudes, so adapter tests choose what is "found": images whose
seed is in ``seeds`` come back with an exposed-breast detection, every other one with a face
only (a label ``[moderation] labels`` does not count). Each call's thread is recorded.
"""

from __future__ import annotations

import threading

from engine.png import read_parameters

FLAGGED = ("FEMALE_BREAST_EXPOSED", 0.91)
HARMLESS = ("FACE_FEMALE", 0.88)


class FakeDetector:
    def __init__(self, *seeds: int) -> None:
        self.seeds = set(seeds)
        self.threads: list[str] = []
        self.checked: list[int] = []  # the seeds of the images checked, in order

    def __call__(self, png: bytes) -> list[tuple[str, float]]:
        self.threads.append(threading.current_thread().name)
        seed = int(read_parameters(png)["Seed"])
        self.checked.append(seed)
        return [FLAGGED, HARMLESS] if seed in self.seeds else [HARMLESS]
