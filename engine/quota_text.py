"""The sentences of a rate-limit refusal, for every rule (a user's window, their day, a chat as a
whole) and both units (images, or images of the default size under ``gpu_seconds``).

Each refusal is a ``Phrase`` (``engine/errors.py``): one whole message id per kind of refusal,
per whose limit it is (yours, this server's, this group's) and per singular/plural, so that a
translator sees every sentence whole. The period ("this hour", "the last 24 hours") and the wait
("12 minutes") are small phrases of their own, said in the reader's language too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import N_, N_plural, Phrase


@dataclass(frozen=True)
class Who:
    """Whose limit: the user's ('you') or a chat's as a whole ('server', 'group':
    ``engine/caps.py``)."""

    key: str = "you"

    @classmethod
    def chat(cls, word: str) -> Who:
        return cls(word)


YOU = Who()

# {left}, {limit} and {asked} are amounts as shown ("2", "0.45"); each pair is picked by the
# amount its comment names.
_PARTIAL = {  # some left, not enough for this job; by {left}
    "you": N_plural(
        "You have {left} image left for {period} and this asks for {asked}; try --n {left}, "
        "or ask again in {wait}.",
        "You have {left} images left for {period} and this asks for {asked}; try --n {left}, "
        "or ask again in {wait}."),
    "server": N_plural(
        "This server has {left} image left for {period} and this asks for {asked}; try --n "
        "{left}, or ask again in {wait}.",
        "This server has {left} images left for {period} and this asks for {asked}; try --n "
        "{left}, or ask again in {wait}."),
    "group": N_plural(
        "This group has {left} image left for {period} and this asks for {asked}; try --n "
        "{left}, or ask again in {wait}.",
        "This group has {left} images left for {period} and this asks for {asked}; try --n "
        "{left}, or ask again in {wait}."),
}
_PARTIAL_PRICED = {  # by {asked}
    "you": N_plural(
        "This asks for {asked} image's worth; you have {left} left for {period}. Ask for fewer "
        "steps, a smaller size or a smaller --n, or ask again in {wait}.",
        "This asks for {asked} images' worth; you have {left} left for {period}. Ask for fewer "
        "steps, a smaller size or a smaller --n, or ask again in {wait}."),
    "server": N_plural(
        "This asks for {asked} image's worth; this server has {left} left for {period}. Ask for "
        "fewer steps, a smaller size or a smaller --n, or ask again in {wait}.",
        "This asks for {asked} images' worth; this server has {left} left for {period}. Ask for "
        "fewer steps, a smaller size or a smaller --n, or ask again in {wait}."),
    "group": N_plural(
        "This asks for {asked} image's worth; this group has {left} left for {period}. Ask for "
        "fewer steps, a smaller size or a smaller --n, or ask again in {wait}.",
        "This asks for {asked} images' worth; this group has {left} left for {period}. Ask for "
        "fewer steps, a smaller size or a smaller --n, or ask again in {wait}."),
}
_TOO_BIG = {  # the job alone is over the whole limit; by {limit}
    "you": N_plural("Your limit is {limit} image for {period}; please ask for at most --n "
                    "{limit}.",
                    "Your limit is {limit} images for {period}; please ask for at most --n "
                    "{limit}."),
    "server": N_plural("This server's limit is {limit} image for {period}; please ask for at "
                       "most --n {limit}.",
                       "This server's limit is {limit} images for {period}; please ask for at "
                       "most --n {limit}."),
    "group": N_plural("This group's limit is {limit} image for {period}; please ask for at most "
                      "--n {limit}.",
                      "This group's limit is {limit} images for {period}; please ask for at "
                      "most --n {limit}."),
}
_CHAT_TOO_BIG_PRICED = N_plural(  # the English is the same for a server and a group
    "This asks for {asked} image's worth, more than its limit of {limit} for {period}; please "
    "ask for fewer steps, a smaller size or a smaller --n.",
    "This asks for {asked} images' worth, more than its limit of {limit} for {period}; please "
    "ask for fewer steps, a smaller size or a smaller --n.")
_TOO_BIG_PRICED = {  # by {asked}
    "you": N_plural(
        "This asks for {asked} image's worth, more than your limit of {limit} for {period}; "
        "please ask for fewer steps, a smaller size or a smaller --n.",
        "This asks for {asked} images' worth, more than your limit of {limit} for {period}; "
        "please ask for fewer steps, a smaller size or a smaller --n."),
    "server": _CHAT_TOO_BIG_PRICED,
    "group": _CHAT_TOO_BIG_PRICED,
}
_USED_UP = {  # nothing left; by {limit}
    "you": N_plural("You have used your {limit} image for {period}; you can ask again in "
                    "{wait}.",
                    "You have used your {limit} images for {period}; you can ask again in "
                    "{wait}."),
    "server": N_plural("This server has used its {limit} image for {period}; you can ask again "
                       "in {wait}.",
                       "This server has used its {limit} images for {period}; you can ask "
                       "again in {wait}."),
    "group": N_plural("This group has used its {limit} image for {period}; you can ask again in "
                      "{wait}.",
                      "This group has used its {limit} images for {period}; you can ask again "
                      "in {wait}."),
}
_USED_UP_PRICED = {  # by {limit}
    "you": N_plural(
        "You have used your {limit} image's worth for {period}; this asks for {asked}, which "
        "fits again in {wait}.",
        "You have used your {limit} images' worth for {period}; this asks for {asked}, which "
        "fits again in {wait}."),
    "server": N_plural(
        "This server has used its {limit} image's worth for {period}; this asks for {asked}, "
        "which fits again in {wait}.",
        "This server has used its {limit} images' worth for {period}; this asks for {asked}, "
        "which fits again in {wait}."),
    "group": N_plural(
        "This group has used its {limit} image's worth for {period}; this asks for {asked}, "
        "which fits again in {wait}.",
        "This group has used its {limit} images' worth for {period}; this asks for {asked}, "
        "which fits again in {wait}."),
}

# The window as a period: "this hour" for one unit, else "the last 6 hours" (never one).
_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))
_THIS = {"day": N_("this day"), "hour": N_("this hour"), "minute": N_("this minute"),
         "second": N_("this second")}
_LAST = {"day": N_("the last {n} days"), "hour": N_("the last {n} hours"),
         "minute": N_("the last {n} minutes"), "second": N_("the last {n} seconds")}
_SECONDS = N_plural("{n} second", "{n} seconds")
_MINUTES = N_plural("{n} minute", "{n} minutes")
_HOURS = N_plural("{n} hour", "{n} hours")


def number(value: float) -> str:
    """A count as shown: '3', '2.5'."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def amount(value: float, *, up: bool) -> str:
    """Images of the default size: two decimals under one, else one; the price rounded up and
    what is left rounded down, so a refusal never reads '1.2 asked, 1.2 left'."""
    scale = 100 if value < 1 else 10
    rounded = (math.ceil(value * scale - 1e-9) if up else math.floor(value * scale + 1e-9))
    return f"{rounded / scale:g}"


def _count(shown: str) -> int:
    """The whole number that picks the plural form of an amount as shown; gettext counts are
    whole numbers, and a fraction ('2.5', '0.45') reads as a plural in English, as 2 does."""
    return int(shown) if shown.isdigit() else 2


def partial(who: Who, remaining: float, asked: float, period: Phrase, wait_s: float,
            priced: bool) -> Phrase:
    """Some left, not enough for this job."""
    if priced:
        shown = amount(asked, up=True)
        return Phrase(_PARTIAL_PRICED[who.key], _count(shown), asked=shown,
                      left=amount(remaining, up=False), period=period, wait=wait(wait_s))
    left = number(remaining)
    return Phrase(_PARTIAL[who.key], _count(left), left=left, asked=number(asked),
                  period=period, wait=wait(wait_s))


def too_big(who: Who, limit: float, asked: float, period: Phrase, priced: bool) -> Phrase:
    """The job alone is more than the whole limit."""
    if priced:
        shown = amount(asked, up=True)
        return Phrase(_TOO_BIG_PRICED[who.key], _count(shown), asked=shown,
                      limit=number(limit), period=period)
    return Phrase(_TOO_BIG[who.key], _count(number(limit)), limit=number(limit), period=period)


def used_up(who: Who, limit: float, period: Phrase, wait_s: float, priced: bool,
            asked: float = 1.0) -> Phrase:
    """Nothing left: when it fits again."""
    shown = number(limit)
    if priced:
        return Phrase(_USED_UP_PRICED[who.key], _count(shown), limit=shown, period=period,
                      asked=amount(asked, up=True), wait=wait(wait_s))
    return Phrase(_USED_UP[who.key], _count(shown), limit=shown, period=period,
                  wait=wait(wait_s))


def zero_limit() -> Phrase:
    return Phrase(N_("An admin has set your image limit to 0, so you cannot make images here "
                     "for now."))


def window(window_s: float) -> Phrase:
    """'this hour', 'the last 6 hours', 'the last 90 minutes' (the largest unit that fits
    evenly)."""
    seconds = math.ceil(window_s)
    for unit, size in _UNITS:
        if seconds % size == 0:
            count = seconds // size
            # never one: a plural in English (ngettext would pick by it in other languages)
            return Phrase(_THIS[unit]) if count == 1 else Phrase(_LAST[unit], n=count)
    raise AssertionError("unreachable: every whole number of seconds divides by 1")


def last_24_hours() -> Phrase:
    return Phrase(_LAST["hour"], n=24)


def wait(wait_s: float) -> Phrase:
    """A wait rounded up: '40 seconds', '12 minutes', '2 hours', '1 hour and 5 minutes'."""
    # Round away float noise first (720.0000001 s is 12 minutes, not 13), then round up.
    seconds = max(1, math.ceil(round(wait_s, 3)))
    if seconds < 60:
        return Phrase(_SECONDS, seconds, n=seconds)
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return Phrase(_MINUTES, minutes, n=minutes)
    hours, minutes = divmod(minutes, 60)
    said = Phrase(_HOURS, hours, n=hours)
    if not minutes:
        return said
    return Phrase(N_("{hours} and {minutes}"), hours=said,
                  minutes=Phrase(_MINUTES, minutes, n=minutes))
