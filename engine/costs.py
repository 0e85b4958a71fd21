"""What a job costs under ``[rate_limit] mode = "gpu_seconds"``: its GPU work, in images of
the default size.

A job's work is ``steps_run × pixels × count``; one image of the default size at the default
steps costs 1.0, so a 512², 4-step image costs 0.05 and a 1024², 50-step one 2.5.

Step time is not quite proportional to pixels (every step has a fixed part; attention grows
faster than the pixels), so once this GPU has measured seconds per step at two or more sizes,
the model fits ``t(pixels) = a + b·pixels`` to them and prices a step at ``t(p) / t(default)``.
The measurements are each finished job's median s/step, kept in the journal (``jobs.step_s``):
the calibration survives restarts with no table of its own, and the same numbers feed
``/stats``. Until two sizes are measured (or when the step time does not grow with the size,
as with the dry-run backend's fixed sleep) the cost is proportional to pixels.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from engine.config import LimitsSection
from engine.request import ImageRequest

# Recent measurements kept per image size, and sizes kept (the oldest size goes first).
PER_SIZE = 20
MAX_SIZES = 64
# Sizes closer than this ratio cannot tell the fixed part from the per-pixel part.
MIN_SPREAD = 1.25


@dataclass(frozen=True)
class StepCost:
    """Seconds per step ``fixed + per_pixel × pixels``; None = no calibration yet."""

    fixed: float
    per_pixel: float

    def at(self, pixels: int) -> float:
        return self.fixed + self.per_pixel * pixels


class CostModel:
    """Prices requests; ``observe`` feeds it each finished job's measured s/step."""

    def __init__(self, limits: LimitsSection) -> None:
        self.default_steps = limits.steps_default
        self.default_pixels = limits.width_default * limits.height_default
        self._seen: dict[int, deque[float]] = {}  # pixels -> recent s/step, oldest first
        self._fit: StepCost | None = None

    def cost(self, request: ImageRequest) -> float:
        """The request's GPU work in images of the default size (default steps and size)."""
        pixels = request.width * request.height
        size = self._relative(pixels)
        return request.count * request.steps_run * size / self.default_steps

    def _relative(self, pixels: int) -> float:
        """One step at ``pixels`` against one step at the default size."""
        if self._fit is None:
            return pixels / self.default_pixels
        return self._fit.at(pixels) / self._fit.at(self.default_pixels)

    @property
    def calibration(self) -> StepCost | None:
        return self._fit

    def seed(self, measured: list[tuple[int, float]]) -> None:
        """Measurements read back from the journal at start-up, oldest first."""
        for pixels, step_s in measured:
            self._add(pixels, step_s)
        self._fit = fit(self._medians())

    def observe(self, pixels: int, step_s: float | None) -> None:
        if self._add(pixels, step_s):
            self._fit = fit(self._medians())

    def _add(self, pixels: int, step_s: float | None) -> bool:
        if step_s is None or step_s <= 0 or pixels <= 0:
            return False
        seen = self._seen.pop(pixels, None) or deque(maxlen=PER_SIZE)
        seen.append(step_s)
        self._seen[pixels] = seen  # re-inserted: the most recently used sizes are kept
        while len(self._seen) > MAX_SIZES:
            del self._seen[next(iter(self._seen))]
        return True

    def _medians(self) -> list[tuple[int, float]]:
        return [(pixels, statistics.median(times)) for pixels, times in self._seen.items()]


def fit(points: list[tuple[int, float]]) -> StepCost | None:
    """Least squares ``t = a + b·p`` over one median per size; None where it cannot tell (one
    size, sizes too close together) or the time does not grow with the size. A negative fixed
    part (noise) becomes a line through the origin."""
    if len(points) < 2:
        return None
    sizes = [p for p, _ in points]
    if max(sizes) < MIN_SPREAD * min(sizes):
        return None
    n = len(points)
    mean_p = sum(sizes) / n
    mean_t = sum(t for _, t in points) / n
    spread = sum((p - mean_p) ** 2 for p in sizes)
    slope = sum((p - mean_p) * (t - mean_t) for p, t in points) / spread
    if slope <= 0:
        return None
    fixed = mean_t - slope * mean_p
    if fixed < 0:
        return StepCost(0.0, sum(p * t for p, t in points) / sum(p * p for p in sizes))
    return StepCost(fixed, slope)
