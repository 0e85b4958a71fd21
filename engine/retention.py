"""Retention: what is older than ``[engine] keep_outputs_days`` leaves the journal and the disk.

Answered jobs (delivered, given up, or cancelled) lose their journal rows and image files;
queued, running and undelivered ones stay whatever their age. Run at start-up and once a day.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from engine import result_files
from engine.store import Store

log = logging.getLogger(__name__)
PRUNE_EVERY_S = 86400.0


async def prune(store: Store, keep_days: float, now: float) -> int:
    """Delete what is older than ``keep_days`` (0: nothing); returns how many jobs went."""
    if keep_days <= 0:
        return 0
    paths = await store.prune(now - keep_days * 86400)
    await asyncio.to_thread(_delete_files, [p for p in paths if p])
    if paths:
        log.info("retention: removed %d jobs older than %g days", len(paths), keep_days)
    return len(paths)


async def prune_daily(run: Callable[[], Awaitable[int]]) -> None:
    """``run`` now and then every ``PRUNE_EVERY_S``, until cancelled."""
    while True:
        try:
            await run()
        except Exception:  # a full disk or a locked file must not stop the bot
            log.exception("retention: pruning failed; trying again tomorrow")
        await asyncio.sleep(PRUNE_EVERY_S)


def _delete_files(paths: list[str]) -> None:
    for path in paths:  # the journal names a job's first image; --n jobs have more beside it
        for file in result_files.siblings(path):
            file.unlink(missing_ok=True)
