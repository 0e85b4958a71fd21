"""Rate limits: what a user, and a chat as a whole, may still ask for in a rolling window.

Three rules, each over its own rolling window; admins are exempt from all of them:

- a user's ``images_per_window`` per ``window_s`` (or the user's ``/limit`` override),
- a user's ``images_per_day`` over the last 24 hours (not for an override of "unlimited"),
- a chat's ``per_chat_images_per_window`` per ``window_s``, counted across its users (a Discord
  server or Telegram group: ``engine/caps.py``).

In ``mode = "images"`` each rule counts images (a ``--n 4`` job is four); in ``"gpu_seconds"``
it counts each job's cost in images of the default size (``engine/costs.py``). The journal is
the only state: every job is stored with its images, its cost and its chat, so the limits
survive restarts and a refunded job (the engine's fault; ``engine/lifecycle.py``) frees its
share at once. A job created at time ``t`` counts for the half-open interval
``[t, t + window)``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine import quota_text as text
from engine.caps import chat_word, group_key
from engine.config import AccessSection, LimitsSection, RateLimitSection
from engine.costs import CostModel
from engine.errors import Phrase, RateLimited
from engine.request import ImageRequest, Origin, User
from engine.store import UNLIMITED, Store

__all__ = ["Charge", "Quota", "RateLimiter"]

DAY_S = 86400.0
EPSILON = 1e-9  # costs are floats: 0.1 + 0.2 must fit under 0.3


@dataclass(frozen=True)
class Quota:
    limit: float | None  # None = unlimited (admins, or a limit of 0)
    used: float  # charged in the current window (images, or images of the default size)
    remaining: float | None  # None = unlimited
    resets_at: float | None  # when the next one frees (the oldest counted job leaves the window)
    priced: bool = False  # amounts are images of the default size (mode "gpu_seconds")
    day: Quota | None = None  # the daily cap, where one applies
    chat: Quota | None = None  # the server's or group's shared window, where one is capped
    chat_word: str = ""  # what that chat is called: "server" or "group" (engine/caps.py)


@dataclass(frozen=True)
class Charge:
    """What a new job is charged: ``amount`` against the limits (its images, or its cost under
    ``gpu_seconds``); ``cost`` and ``group`` are journalled with it."""

    amount: float
    cost: float
    group: str


@dataclass(frozen=True)
class Spent:
    """What counts in one window: (asked at, amount) of each charged job, oldest first."""

    charges: list[tuple[float, float]]
    window_s: float

    @property
    def used(self) -> float:
        return sum(amount for _, amount in self.charges)

    def fits_at(self, limit: float, need: float) -> float | None:
        """When enough of the oldest jobs have left the window for ``need`` more to fit under
        ``limit``; None when it fits now, or never will (``need`` is over the limit)."""
        excess = self.used - (limit - need)
        if excess <= EPSILON or need > limit + EPSILON:
            return None
        for at, amount in self.charges:
            excess -= amount
            if excess <= EPSILON:
                return at + self.window_s
        return None  # pragma: no cover - need <= limit: the whole window leaving makes room

    def quota(self, limit: float, priced: bool) -> Quota:
        used = self.used if priced else round(self.used)
        resets_at = None
        if self.charges and limit:  # a limit of 0 frees nothing up by waiting
            # the next image's room, or (room left already) the oldest job leaving
            resets_at = self.fits_at(limit, 1.0) or self.charges[0][0] + self.window_s
        return Quota(limit=limit, used=used, remaining=max(0, limit - used), resets_at=resets_at,
                     priced=priced)


@dataclass(frozen=True)
class Rule:
    who: text.Who
    limit: float
    period: Phrase  # "this hour", "the last 24 hours"


class RateLimiter:
    def __init__(
        self,
        store: Store,
        config: RateLimitSection,
        access: AccessSection,
        clock: Callable[[], float] = time.time,
        limits: LimitsSection | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.access = access
        self.clock = clock
        self.costs = CostModel(limits or LimitsSection())

    @property
    def priced(self) -> bool:
        return self.config.mode == "gpu_seconds"

    async def limit_for(self, user: User) -> int | None:
        """The user's images per window, or None for no limit. The config's 0 means no limit;
        an admin's override of 0 means none at all (the user may make no images)."""
        if self.access.is_admin(user):
            return None
        return self._window_limit(await self.store.get_limit_override(user))

    def _window_limit(self, override: int | None) -> int | None:
        if override == UNLIMITED:
            return None
        if override is not None:
            return override
        return self.config.images_per_window or None

    def _day_limit(self, override: int | None) -> int | None:
        return None if override == UNLIMITED else self.config.images_per_day or None

    async def _spent(self, window_s: float, *, user: User | None = None,
                     group: str = "") -> Spent:
        start = self.clock() - window_s
        charges = await self.store.charges_since(start, user=user, group=group,
                                                 priced=self.priced)
        # The store counts "at or after"; a job exactly window_s old has just left the window.
        return Spent([(at, amount) for at, amount in charges if at > start], window_s)

    async def quota(self, user: User, origin: Origin | None = None) -> Quota:
        """The user's own window (and daily cap), for ``/limits``; asked in a server or group
        whose use is capped as a whole, that chat's window too (shared by everyone in it)."""
        own = await self._own_quota(user)
        group = group_key(origin) if origin is not None else ""
        cap = self.config.per_chat_images_per_window
        if not group or not cap:
            return own
        chat = (await self._spent(self.config.window_s, group=group)).quota(cap, self.priced)
        return dataclasses.replace(own, chat=chat, chat_word=chat_word(group))

    async def _own_quota(self, user: User) -> Quota:
        spent = await self._spent(self.config.window_s, user=user)
        if self.access.is_admin(user):
            used = spent.used if self.priced else round(spent.used)
            return Quota(limit=None, used=used, remaining=None, resets_at=None,
                         priced=self.priced)
        override = await self.store.get_limit_override(user)
        limit, day_limit = self._window_limit(override), self._day_limit(override)
        day = None
        if day_limit is not None:
            day = (await self._spent(DAY_S, user=user)).quota(day_limit, self.priced)
        if limit is None:
            used = spent.used if self.priced else round(spent.used)
            return Quota(limit=None, used=used, remaining=None, resets_at=None,
                         priced=self.priced, day=day)
        quota = spent.quota(limit, self.priced)
        return Quota(quota.limit, quota.used, quota.remaining, quota.resets_at, self.priced, day)

    async def admit(self, user: User, request: ImageRequest, origin: Origin) -> Charge:
        """Price the request and check every rule (``RateLimited`` says which one refused);
        returns what to journal with the job."""
        cost = self.costs.cost(request)
        charge = Charge(cost if self.priced else request.count, cost, group_key(origin))
        await self.check(user, charge.amount, charge.group)
        return charge

    async def check(self, user: User, amount: float = 1, group: str = "") -> None:
        """Raise ``RateLimited`` if ``user`` (in chat ``group``) may not be charged ``amount``
        more now: images, or images of the default size under ``gpu_seconds``."""
        if self.access.is_admin(user):
            return
        override = await self.store.get_limit_override(user)
        window = self._window_limit(override)
        if window is not None:
            spent = await self._spent(self.config.window_s, user=user)
            self._refuse_if_over(Rule(text.YOU, window, text.window(self.config.window_s)),
                                 spent, amount)
        day = self._day_limit(override)
        if day is not None:
            spent = await self._spent(DAY_S, user=user)
            self._refuse_if_over(Rule(text.YOU, day, text.last_24_hours()), spent, amount)
        if group and self.config.per_chat_images_per_window:
            spent = await self._spent(self.config.window_s, group=group)
            rule = Rule(text.Who.chat(chat_word(group)), self.config.per_chat_images_per_window,
                        text.window(self.config.window_s))
            self._refuse_if_over(rule, spent, amount)

    def _refuse_if_over(self, rule: Rule, spent: Spent, amount: float) -> None:
        now, limit, priced = self.clock(), rule.limit, self.priced
        remaining = max(0.0, limit - spent.used)
        if remaining + EPSILON >= amount:
            return
        if remaining > EPSILON and amount <= limit + EPSILON:
            # Some left, not enough for this job: wait until enough old ones leave the window.
            ready_at = spent.fits_at(limit, amount) or now
            left = remaining if priced else round(remaining)
            raise RateLimited(text.partial(rule.who, left, amount, rule.period, ready_at - now,
                                           priced), retry_at=ready_at)
        if amount > limit > 0:
            raise RateLimited(text.too_big(rule.who, limit, amount, rule.period, priced),
                              retry_at=now)
        if limit == 0:
            raise RateLimited(text.zero_limit(), retry_at=now + self.config.window_s)
        # Nothing left. Counting images, the wait is for the next image (as before v8); priced,
        # for this job's cost to fit.
        ready_at = spent.fits_at(limit, amount if priced else 1.0) or now
        raise RateLimited(text.used_up(rule.who, limit, rule.period, ready_at - now, priced,
                                       amount), retry_at=ready_at)
