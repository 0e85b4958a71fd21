"""Per-user rate limit: at most N charged images in any rolling window of ``window_s`` seconds.

The journal is the only state: a user's charged jobs are read back from the store, so the limit
survives restarts and a refunded job (the engine's fault) frees its slot at once. A job created
at time ``t`` occupies a slot for the half-open interval ``[t, t + window_s)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.config import AccessSection, RateLimitSection
from engine.errors import RateLimited
from engine.request import User
from engine.store import UNLIMITED, Store


@dataclass(frozen=True)
class Quota:
    limit: int | None  # None = unlimited (admins, or a limit of 0)
    used: int  # charged images in the current window
    remaining: int | None  # None = unlimited
    resets_at: float | None  # when the next slot frees (the oldest counted job leaves the window)


class RateLimiter:
    def __init__(
        self,
        store: Store,
        config: RateLimitSection,
        access: AccessSection,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config = config
        self.access = access
        self.clock = clock

    async def limit_for(self, user: User) -> int | None:
        """The user's images per window, or None for no limit. The config's 0 means no limit;
        an admin's override of 0 means none at all (the user may make no images)."""
        if self.access.is_admin(user):
            return None
        override = await self.store.get_limit_override(user)
        if override == UNLIMITED:
            return None
        if override is not None:
            return override
        return self.config.images_per_window or None

    async def _charged_times(self, user: User) -> list[float]:
        """When each image charged in the current window was asked for, oldest first."""
        start = self.clock() - self.config.window_s
        times = await self.store.charged_times_since(user, start)
        # The store counts "at or after"; a job exactly window_s old has just left the window.
        return [t for t in times if t > start]

    async def quota(self, user: User) -> Quota:
        times = await self._charged_times(user)
        limit = await self.limit_for(user)
        if limit is None:
            return Quota(limit=None, used=len(times), remaining=None, resets_at=None)
        used = len(times)
        resets_at = None
        if used and limit:  # a limit of 0 frees nothing up by waiting
            # Over the limit (an override was lowered) more than one job has to leave first.
            resets_at = times[max(0, used - limit)] + self.config.window_s
        return Quota(limit=limit, used=used, remaining=max(0, limit - used), resets_at=resets_at)

    async def check(self, user: User, images: int = 1) -> None:
        """Raise ``RateLimited`` if the user may not start ``images`` more images now."""
        quota = await self.quota(user)
        if quota.remaining is None or quota.remaining >= images:
            return
        if quota.remaining > 0 and quota.limit is not None and images <= quota.limit:
            # Some left, not enough for this --n: wait until enough old ones leave the window.
            times = await self._charged_times(user)
            ready_at = times[quota.used - quota.limit + images - 1] + self.config.window_s
            left = "image" if quota.remaining == 1 else "images"
            raise RateLimited(
                f"You have {quota.remaining} {left} left for "
                f"{describe_window(self.config.window_s)} and this asks for {images}; try "
                f"--n {quota.remaining}, or ask again in "
                f"{describe_wait(ready_at - self.clock())}.", retry_at=ready_at)
        if quota.limit is not None and images > quota.limit > 0:
            raise RateLimited(f"Your limit is {quota.limit} images for "
                              f"{describe_window(self.config.window_s)}; please ask for at most "
                              f"--n {quota.limit}.", retry_at=self.clock())
        if quota.limit == 0:
            raise RateLimited("An admin has set your image limit to 0, so you cannot make "
                              "images here for now.", retry_at=self.clock() + self.config.window_s)
        assert quota.limit is not None and quota.resets_at is not None  # remaining == 0
        raise RateLimited(
            refusal_message(quota.limit, self.config.window_s, quota.resets_at - self.clock()),
            retry_at=quota.resets_at,
        )


def refusal_message(limit: int, window_s: float, wait_s: float) -> str:
    """E.g. 'You have used your 10 images for this hour; you can ask again in 12 minutes.'"""
    images = "image" if limit == 1 else "images"
    return (
        f"You have used your {limit} {images} for {describe_window(window_s)}; "
        f"you can ask again in {describe_wait(wait_s)}."
    )


_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


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
