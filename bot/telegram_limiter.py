"""Telegram flood control that answers commands first.

    app = Application.builder().token(token).rate_limiter(PriorityRateLimiter()).build()
    await bot.send_message(..., rate_limit_args=ACK)   # the first answer to a command

python-telegram-bot's ``AIORateLimiter`` keeps Telegram's limits (30 requests a second overall,
20 a minute per group) in one first-come line, so under load a reply to a new command waits behind
the photos, progress edits, chat actions and deletes of jobs already accepted (8.5 s median in the
load test). This limiter keeps the same limits with the same leaky buckets (``aiolimiter``), but
in two lanes: requests marked ``rate_limit_args=ACK`` go straight to the bucket; everything else
("background") waits while an acknowledgement is waiting, and only ``background_slots`` background
requests wait in a bucket at a time, so an acknowledgement is never more than that many places
behind. A 429's ``retry_after`` pauses every request, as in ``AIORateLimiter``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

from aiolimiter import AsyncLimiter
from telegram.constants import FloodLimit
from telegram.error import RetryAfter
from telegram.ext import BaseRateLimiter
from telegram.warnings import PTBDeprecationWarning

log = logging.getLogger(__name__)

JSONResult = bool | dict[str, Any] | list[dict[str, Any]]


class Lane(enum.Enum):
    ACK = "ack"  # the first answer to a command or press: goes ahead of everything else


ACK = Lane.ACK


class PriorityBucket:
    """One leaky bucket with an acknowledgement lane ahead of a background lane."""

    def __init__(self, max_rate: float, period_s: float, background_slots: int) -> None:
        self.limiter = AsyncLimiter(max_rate, period_s)
        self.background_slots = background_slots
        self.acks_waiting = 0
        self.background_waiting = 0
        self._changed = asyncio.Condition()

    async def acquire(self, ack: bool) -> None:
        """Wait for this request's place in the bucket."""
        if ack:
            self.acks_waiting += 1
            try:
                await self.limiter.acquire()
            finally:
                self.acks_waiting -= 1
                await self._notify()
            return
        async with self._changed:
            await self._changed.wait_for(self._background_may_enter)
            self.background_waiting += 1
        try:
            await self.limiter.acquire()
        finally:
            self.background_waiting -= 1
            await self._notify()

    def _background_may_enter(self) -> bool:
        return self.acks_waiting == 0 and self.background_waiting < self.background_slots

    def idle(self) -> bool:
        return (not self.acks_waiting and not self.background_waiting
                and self.limiter.has_capacity(self.limiter.max_rate))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


class PriorityRateLimiter(BaseRateLimiter[Lane]):
    """Telegram's overall and per-group limits, acknowledgements first (see the module doc)."""

    def __init__(self, *, overall_per_s: float = FloodLimit.MESSAGES_PER_SECOND,
                 group_per_minute: float = FloodLimit.MESSAGES_PER_MINUTE_PER_GROUP,
                 max_retries: int = 0, background_slots: int = 2) -> None:
        self.max_retries = max_retries
        self.group_per_minute = group_per_minute
        self.background_slots = background_slots
        self.overall = PriorityBucket(overall_per_s, 1.0, background_slots)
        self.groups: dict[int | str, PriorityBucket] = {}
        self._not_paused = asyncio.Event()
        self._not_paused.set()

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to release."""

    async def process_request(
        self, callback: Callable[..., Coroutine[Any, Any, JSONResult]], args: Any,
        kwargs: dict[str, Any], endpoint: str, data: dict[str, Any],
        rate_limit_args: Lane | None,
    ) -> JSONResult:
        """Wait for the request's lane and bucket(s), send it, and wait out 429s."""
        ack = rate_limit_args is Lane.ACK
        chat_id = data.get("chat_id")
        for attempt in range(self.max_retries + 1):
            try:
                return await self._run(chat_id, ack, callback, args, kwargs)
            except RetryAfter as exc:
                if attempt == self.max_retries:
                    log.warning("telegram: %s still rate limited after %d retries", endpoint,
                                self.max_retries)
                    raise
                seconds = _seconds(exc)
                log.info("telegram: rate limited; retrying %s in %.1f s", endpoint, seconds)
                self._not_paused.clear()  # everyone waits: the 429 is for the whole bot
                try:
                    await asyncio.sleep(seconds + 0.1)
                finally:
                    self._not_paused.set()
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _run(self, chat_id: object, ack: bool,
                   callback: Callable[..., Coroutine[Any, Any, JSONResult]], args: Any,
                   kwargs: dict[str, Any]) -> JSONResult:
        # Like AIORateLimiter: requests without a chat (getMe, answerCallbackQuery, menus) are
        # not counted; group and channel chats also count against their own bucket, first.
        if chat_id is not None:
            group = _group_of(chat_id)
            if group is not None and self.group_per_minute:
                await self._group_bucket(group).acquire(ack)
            await self.overall.acquire(ack)
        await self._not_paused.wait()
        return await callback(*args, **kwargs)

    def _group_bucket(self, group: int | str) -> PriorityBucket:
        if len(self.groups) > 512:  # forget idle groups (as AIORateLimiter does)
            for key in [k for k, b in self.groups.items() if k != group and b.idle()]:
                del self.groups[key]
        bucket = self.groups.get(group)
        if bucket is None:
            bucket = PriorityBucket(self.group_per_minute, 60.0, 1)
            self.groups[group] = bucket
        return bucket


def _group_of(chat_id: object) -> int | str | None:
    """The group or channel a chat id names (negative ids, ``@channel`` names); None if private."""
    try:
        number = int(chat_id)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return str(chat_id)
    return number if number < 0 else None


def _seconds(exc: RetryAfter) -> float:
    """``retry_after`` in seconds, whether PTB gives an int or (``PTB_TIMEDELTA``) a timedelta."""
    with warnings.catch_warnings():  # PTB 22 warns that the int form will become a timedelta
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        pause = exc.retry_after
    return float(pause) if isinstance(pause, (int, float)) else pause.total_seconds()
