"""The sentences of a rate-limit refusal, for every rule (a user's window, their day, a chat as a
whole) and both units (images, or images of the default size under ``gpu_seconds``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


@dataclass(frozen=True)
class Who:
    """Whose limit: the user ('You have … your …') or a chat ('This server has … its …')."""

    has: str = "You have"
    owns: str = "your"

    @classmethod
    def chat(cls, word: str) -> Who:
        return cls(f"This {word} has", "its")

    @property
    def possessive(self) -> str:  # "Your limit", "This server's limit"
        return "Your" if self.owns == "your" else self.has.removesuffix(" has") + "'s"


YOU = Who()


def images(count: float) -> str:
    return f"{count:g} image" if count == 1 else f"{count:g} images"


def amount(value: float, *, up: bool) -> str:
    """Images of the default size: two decimals under one, else one; the price rounded up and
    what is left rounded down, so a refusal never reads '1.2 asked, 1.2 left'."""
    scale = 100 if value < 1 else 10
    rounded = (math.ceil(value * scale - 1e-9) if up else math.floor(value * scale + 1e-9))
    return f"{rounded / scale:g}"


def worth(text: str) -> str:
    """'1 image's worth', '2.5 images' worth'."""
    return f"{text} image's worth" if text == "1" else f"{text} images' worth"


def partial(who: Who, remaining: float, asked: float, period: str, wait: str,
            priced: bool) -> str:
    """Some left, not enough for this job."""
    if priced:
        return (f"This asks for {worth(amount(asked, up=True))}; {who.has.lower()} "
                f"{amount(remaining, up=False)} left for {period}. Ask for fewer steps, a smaller "
                f"size or a smaller --n, or ask again in {wait}.")
    return (f"{who.has} {images(remaining)} left for {period} and this asks for {asked:g}; "
            f"try --n {remaining:g}, or ask again in {wait}.")


def too_big(who: Who, limit: float, asked: float, period: str, priced: bool) -> str:
    """The job alone is more than the whole limit."""
    if priced:
        return (f"This asks for {worth(amount(asked, up=True))}, more than "
                f"{who.owns} limit of {limit:g} for {period}; please ask for fewer steps, a "
                "smaller size or a smaller --n.")
    return (f"{who.possessive} limit is {images(limit)} for {period}; please ask for at most "
            f"--n {limit:g}.")


def used_up(who: Who, limit: float, period: str, wait_s: float, priced: bool,
            asked: float = 1.0) -> str:
    """Nothing left: when it fits again."""
    if priced:
        return (f"{who.has} used {who.owns} {worth(f'{limit:g}')} for {period}; this asks for "
                f"{amount(asked, up=True)}, which fits again in {describe_wait(wait_s)}.")
    if who == YOU:
        return refusal_message(int(limit), 0.0, wait_s, period)
    return (f"{who.has} used {who.owns} {images(limit)} for {period}; you can ask again in "
            f"{describe_wait(wait_s)}.")


def zero_limit() -> str:
    return ("An admin has set your image limit to 0, so you cannot make images here for now.")


def refusal_message(limit: int, window_s: float, wait_s: float, period: str = "") -> str:
    """E.g. 'You have used your 10 images for this hour; you can ask again in 12 minutes.'"""
    noun = "image" if limit == 1 else "images"
    return (
        f"You have used your {limit} {noun} for {period or describe_window(window_s)}; "
        f"you can ask again in {describe_wait(wait_s)}."
    )


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


def describe_window(window_s: float) -> str:
    """'this hour', 'the last 6 hours', 'the last 90 minutes' (the largest unit that fits
    evenly)."""
    seconds = math.ceil(window_s)
    for unit, size in _UNITS:
        if seconds % size == 0:
            count = seconds // size
            return f"this {unit}" if count == 1 else f"the last {_plural(count, unit)}"
    raise AssertionError("unreachable: every whole number of seconds divides by 1")


def describe_wait(wait_s: float) -> str:
    """A wait rounded up: '40 seconds', '12 minutes', '2 hours', '1 hour and 5 minutes'."""
    # Round away float noise first (720.0000001 s is 12 minutes, not 13), then round up.
    seconds = max(1, math.ceil(round(wait_s, 3)))
    if seconds < 60:
        return _plural(seconds, "second")
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return _plural(minutes, "minute")
    hours, minutes = divmod(minutes, 60)
    text = _plural(hours, "hour")
    return f"{text} and {_plural(minutes, 'minute')}" if minutes else text
