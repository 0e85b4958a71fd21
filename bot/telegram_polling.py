"""Telegram updates confirmed only once their commands are in the journal.

python-telegram-bot's ``Updater`` confirms a batch of updates to Telegram (the next
``getUpdates`` offset) as soon as it has queued them, before their handlers run: a SIGKILL right
after a burst lost the commands that were confirmed but not yet journalled (53 of 60 in the load
test), and Telegram never sent them again. Here a batch is handed to the application's handlers
and the offset moves past it only when every handler has returned: each ``/imagine`` has been
journalled (or refused) by then. A crash before that makes Telegram send the batch again after
the restart; the update id, kept with each job as its request key, stops a command from being
queued twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

from telegram import Update
from telegram.error import InvalidToken, TelegramError

log = logging.getLogger(__name__)

# The update a handler is answering, as the request key of the job it queues.
current_update: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_update", default=None)
ALLOWED_UPDATES = ["message", "callback_query"]
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0


def update_key(update: Update) -> str:
    return f"telegram:update:{update.update_id}"


class JournalledPolling:
    def __init__(self, application: Any, timeout_s: float) -> None:
        self.application = application
        self.timeout_s = timeout_s
        self.offset = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="telegram-polling")

    async def stop(self, *, confirm: bool = True) -> None:
        """Stop polling; ``confirm``: tell Telegram that the updates handled so far are done
        (a short call), so that a restart does not receive them again."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if confirm and self.offset:
            try:
                await self.application.bot.get_updates(offset=self.offset, timeout=0, limit=1,
                                                       allowed_updates=ALLOWED_UPDATES)
            except TelegramError as exc:
                log.info("telegram: could not confirm the last updates: %s", exc)

    async def _poll(self) -> None:
        delay = RETRY_FIRST_S
        while True:
            try:
                updates = await self.application.bot.get_updates(
                    offset=self.offset, timeout=self.timeout_s,
                    allowed_updates=ALLOWED_UPDATES)
            except InvalidToken:
                log.error("telegram: the Bot API refused the token; polling stops")
                return
            except TelegramError as exc:
                log.warning("telegram: polling failed (%s); retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_FIRST_S
            if updates:
                await self._handle(updates)
                self.offset = updates[-1].update_id + 1  # confirmed with the next call

    async def _handle(self, updates: list[Update]) -> None:
        """Every update of the batch at once, each in its own task (one slow chat must not
        hold up the others); the batch is done when all have been handled."""
        async def one(update: Update) -> None:
            current_update.set(update_key(update))
            await self.application.process_update(update)

        results = await asyncio.gather(*(one(u) for u in updates), return_exceptions=True)
        for update, result in zip(updates, results, strict=True):
            if isinstance(result, Exception):
                log.error("telegram: update %s failed", update.update_id, exc_info=result)
