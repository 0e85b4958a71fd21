"""Telegram flood control that answers commands first.

    app = Application.builder().token(token).rate_limiter(PriorityRateLimiter()).build()
    await bot.send_message(..., rate_limit_args=ACK)   # the first answer to a command

python-telegram-bot's ``AIORateLimiter`` keeps Telegram's limits (30 requests a second overall,
20 a minute per group) in one first-come line, so under load a reply to a new command waits behind
the photos, progress edits, chat actions and deletes of jobs already accepted (8.5 s median in the
load test). This limiter keeps the same limits with the same leaky buckets (``aiolimiter``), but
in three lanes: requests marked ``rate_limit_args=ACK`` go straight to the bucket; results
(photos, documents, other messages) wait while an acknowledgement is waiting; progress (edits,
chat actions, deletes) waits while a result is waiting too, and a chat action is dropped when
its group's bucket is busy. Only ``background_slots`` background requests wait in a bucket at a
time, so an acknowledgement is never more than that many places behind. A 429's
``retry_after`` pauses every request until its deadline, as in ``AIORateLimiter``.
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
    """One leaky bucket with three lanes: acknowledgements, then results (photos, documents,
    other messages), then progress (edits, chat actions, deletes), so that in a busy group a
    finished image never waits behind other jobs' progress edits."""

    def __init__(self, max_rate: float, period_s: float, background_slots: int) -> None:
        self.limiter = AsyncLimiter(max_rate, period_s)
        self.background_slots = background_slots
        self.acks_waiting = 0
        self.results_waiting = 0  # results wanting a place, in the bucket or before it
        self.background_waiting = 0  # results and progress inside the bucket
        self._changed = asyncio.Condition()

    async def acquire(self, ack: bool, progress: bool = False) -> None:
        """Wait for this request's place in the bucket."""
        if ack:
            self.acks_waiting += 1
            try:
                await self.limiter.acquire()
            finally:
                self.acks_waiting -= 1
                await self._notify()
            return
        if not progress:
            self.results_waiting += 1
        try:
            async with self._changed:
                await self._changed.wait_for(lambda: self._may_enter(progress))
                self.background_waiting += 1
            try:
                await self.limiter.acquire()
            finally:
                self.background_waiting -= 1
        finally:
            if not progress:
                self.results_waiting -= 1
            await self._notify()

    def _may_enter(self, progress: bool) -> bool:
        if self.acks_waiting or self.background_waiting >= self.background_slots:
            return False
        return not (progress and self.results_waiting)

    def busy(self) -> bool:
        """Results or acknowledgements are waiting: progress is worth little now."""
        return bool(self.acks_waiting or self.results_waiting)

    def idle(self) -> bool:
        return (not self.acks_waiting and not self.background_waiting
                and not self.results_waiting and self.limiter.has_capacity(self.limiter.max_rate))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


# Requests that show progress: they go after results, and chat actions are dropped when a
# group's bucket has results or answers waiting (a hint nobody misses).
PROGRESS_ENDPOINTS = {"editMessageText", "editMessageReplyMarkup", "editMessageCaption",
                      "sendChatAction", "deleteMessage"}


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
        self._paused_until = 0.0  # the event loop's clock: a 429 pauses every request until then

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
        progress = not ack and endpoint in PROGRESS_ENDPOINTS
        chat_id = data.get("chat_id")
        if endpoint == "sendChatAction" and self._group_busy(chat_id):
            return True  # "uploading…" is a hint; the group's budget goes to the image itself
        for attempt in range(self.max_retries + 1):
            try:
                return await self._run(chat_id, ack, progress, callback, args, kwargs)
            except RetryAfter as exc:
                if attempt == self.max_retries:
                    log.warning("telegram: %s still rate limited after %d retries", endpoint,
                                self.max_retries)
                    raise
                seconds = _seconds(exc)
                log.info("telegram: rate limited; retrying %s in %.1f s", endpoint, seconds)
                # everyone waits: the 429 is for the whole bot. A deadline, not a flag that the
                # waiting request clears: its cancellation must not lift the pause for all.
                loop = asyncio.get_running_loop()
                self._paused_until = max(self._paused_until, loop.time() + seconds + 0.1)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _group_busy(self, chat_id: object) -> bool:
        group = None if chat_id is None else _group_of(chat_id)
        bucket = None if group is None else self.groups.get(group)
        return bucket is not None and bucket.busy()

    async def _wait_out_pause(self) -> None:
        loop = asyncio.get_running_loop()
        while (left := self._paused_until - loop.time()) > 0:
            await asyncio.sleep(left)

    async def _run(self, chat_id: object, ack: bool, progress: bool,
                   callback: Callable[..., Coroutine[Any, Any, JSONResult]], args: Any,
                   kwargs: dict[str, Any]) -> JSONResult:
        # Like AIORateLimiter: requests without a chat (getMe, answerCallbackQuery, menus) are
        # not counted; group and channel chats also count against their own bucket, first.
        if chat_id is not None:
            group = _group_of(chat_id)
            if group is not None and self.group_per_minute:
                await self._group_bucket(group).acquire(ack, progress)
            await self.overall.acquire(ack, progress)
        await self._wait_out_pause()
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
