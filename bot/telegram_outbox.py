"""Replies to Telegram commands, sent by one task per chat, never awaited in the update handler.

Telegram lets a bot post about 20 messages a minute into one group. When a reply waited for that
bucket inside its handler, a group flooding ``/help`` held python-telegram-bot's concurrent
updates (256) one after another, and every other chat's commands queued behind that group (an
``/imagine`` in a private chat waited 163 s). Here the handler hands its reply to the chat's
outbox and returns at once; the chat's task posts the replies in order. A chat holds at most
``max_waiting`` replies; past that the oldest are dropped (logged), since an answer minutes late
to a flood helps no one: first the ones marked droppable (/help, /queue, /limits), so that a
refusal or an error reply is the last to go. Refusals that repeat (a chat not on the
allow-list) are sent once per ``refusal_interval_s`` per chat at most.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)
Send = Callable[[], Awaitable[object]]
Done = Callable[[], Awaitable[None]]  # a reply is out of the outbox: posted, failed or dropped


class ChatOutbox:
    def __init__(self, max_waiting: int = 5, refusal_interval_s: float = 60.0) -> None:
        self.max_waiting = max_waiting
        self.refusal_interval_s = refusal_interval_s
        self.dropped = 0
        self._waiting: dict[int, deque[tuple[Send, bool, Done | None]]] = {}
        self._senders: dict[int, asyncio.Task[None]] = {}
        self._last_refusal: dict[tuple[int, str], float] = {}
        self._background: set[asyncio.Task[None]] = set()  # ``done`` of dropped replies
        self._closed = False

    def post(self, chat_id: int, send: Send, *, droppable: bool = False,
             done: Done | None = None) -> None:
        """Queue ``send`` for the chat; the chat's task runs it after the earlier ones.
        ``done`` is awaited once the reply has left the outbox, whichever way."""
        if self._closed:
            return
        waiting = self._waiting.setdefault(chat_id, deque())
        waiting.append((send, droppable, done))
        while len(waiting) > self.max_waiting:
            victim = next((item for item in waiting if item[1]), waiting[0])
            waiting.remove(victim)
            if victim[2] is not None:
                self._background.add(asyncio.create_task(victim[2]()))
                self._background = {t for t in self._background if not t.done()}
            self.dropped += 1
            log.info("telegram: chat %s has more replies waiting than it may receive; "
                     "dropped the oldest", chat_id)
        if chat_id not in self._senders:
            self._senders[chat_id] = asyncio.create_task(self._send_all(chat_id),
                                                         name=f"tg-outbox-{chat_id}")

    def refusal_due(self, chat_id: int, kind: str) -> bool:
        """True at most once per ``refusal_interval_s`` for this chat and kind of refusal."""
        now = time.monotonic()
        if len(self._last_refusal) > 10_000:  # forget chats not refused for a while
            self._last_refusal = {k: t for k, t in self._last_refusal.items()
                                  if now - t < self.refusal_interval_s}
        last = self._last_refusal.get((chat_id, kind))
        if last is not None and now - last < self.refusal_interval_s:
            return False
        self._last_refusal[(chat_id, kind)] = now
        return True

    async def _send_all(self, chat_id: int) -> None:
        waiting = self._waiting[chat_id]
        try:
            while waiting:
                send, _, done = waiting.popleft()
                try:
                    await send()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a reply that cannot be posted: logged, not retried
                    log.info("telegram: a reply in chat %s failed: %s", chat_id, exc)
                if done is not None:
                    try:
                        await done()
                    except Exception:
                        log.exception("telegram: after a reply in chat %s", chat_id)
        finally:
            self._senders.pop(chat_id, None)
            if not waiting:
                self._waiting.pop(chat_id, None)

    async def close(self, timeout: float = 5.0) -> None:
        """Post what is waiting (for up to ``timeout``), then stop."""
        self._closed = True
        tasks = list(self._senders.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
