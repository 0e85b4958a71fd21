"""Step times of a running job: the time left for its progress line, s/step for the log."""

from __future__ import annotations


def eta_s(started: float, step_times: list[float], step: int, total: int) -> float | None:
    """Seconds left, from the mean time of the steps after the first (which pays warm-up)."""
    if step >= total:
        return 0.0
    if len(step_times) >= 2:
        per_step = (step_times[-1] - step_times[0]) / (len(step_times) - 1)
    else:
        per_step = step_times[-1] - started if step_times else 0.0
    return per_step * (total - step) if per_step > 0 else None


def median_step_s(step_times: list[float]) -> float | None:
    """The median time between step ends (the first step, which pays warm-up, left out)."""
    gaps = sorted(b - a for a, b in zip(step_times, step_times[1:], strict=False))
    return gaps[len(gaps) // 2] if gaps else None
