"""New requests made from a finished one, as the buttons under an image ask for them.

Both chat adapters use these, so "Re-roll" and "Same seed, more steps" mean the same everywhere.
The result is checked against the current limits again: they may have changed since.
"""

from __future__ import annotations

import random

from engine.config import LimitsSection
from engine.errors import InvalidCommand
from engine.grammar import ParsedCommand
from engine.request import ImageRequest

MORE_STEPS = 10  # "Same seed, more steps" adds this many (up to limits.steps_max)


def reroll(request: ImageRequest, limits: LimitsSection,
           rng: random.Random | None = None) -> ImageRequest:
    """The same request with a new random seed, different from the old one where the range
    allows it."""
    rng = rng or random.SystemRandom()
    seed = request.seed
    for _ in range(10):
        seed = rng.randint(limits.seed_min, limits.seed_max)
        if seed != request.seed:
            break
    return _checked(request, limits, seed, request.steps).with_changes(seed_was_random=True)


def more_steps(request: ImageRequest, limits: LimitsSection,
               extra: int = MORE_STEPS) -> ImageRequest:
    """The same seed with ``extra`` more steps, up to the most allowed."""
    steps = min(request.steps + extra, limits.steps_max)
    if steps <= request.steps:
        raise InvalidCommand(
            f"This image already uses the most steps allowed ({limits.steps_max}).")
    return _checked(request, limits, request.seed, steps)


def _checked(request: ImageRequest, limits: LimitsSection, seed: int,
             steps: int) -> ImageRequest:
    parsed = ParsedCommand(prompt=request.prompt, seed=seed, steps=steps, width=request.width,
                           height=request.height, guidance=request.guidance)
    return parsed.to_request(limits)
