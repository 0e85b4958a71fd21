"""Re-roll and "same seed, more steps": the requests the buttons under an image make."""

from __future__ import annotations

import random

import pytest

from engine.config import LimitsSection
from engine.errors import InvalidCommand
from engine.variants import MORE_STEPS, more_steps, reroll
from tests.conftest import make_request

LIMITS = LimitsSection()


def test_reroll_keeps_everything_but_the_seed():
    old = make_request("a fox", seed=7, steps=12, width=512, height=256)
    new = reroll(old, LIMITS, random.Random(1))
    assert new.seed != 7 and new.seed_was_random
    assert (new.prompt, new.steps, new.width, new.height, new.guidance) == (
        "a fox", 12, 512, 256, 3.5)


def test_reroll_draws_again_when_the_seed_comes_up_the_same():
    class Repeats(random.Random):
        def __init__(self) -> None:
            super().__init__()
            self.draws = iter([7, 7, 9])

        def randint(self, a: int, b: int) -> int:
            return next(self.draws)

    assert reroll(make_request(seed=7), LIMITS, Repeats()).seed == 9


def test_more_steps_adds_up_to_the_limit_then_refuses():
    assert more_steps(make_request(seed=3, steps=20), LIMITS).steps == 20 + MORE_STEPS
    capped = more_steps(make_request(seed=3, steps=45), LIMITS)
    assert capped.steps == LIMITS.steps_max and capped.seed == 3
    with pytest.raises(InvalidCommand, match=r"most steps allowed \(50\)"):
        more_steps(make_request(steps=50), LIMITS)
