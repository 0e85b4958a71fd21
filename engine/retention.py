"""Retention: what is older than ``[engine] keep_outputs_days`` leaves the journal and the disk.

Answered jobs (delivered, given up, or cancelled) lose their journal rows and image files;
queued, running and undelivered ones stay whatever their age. Run at start-up and once a day.
Pictures users sent to start from (``engine/input_image.py``) go once they are that old and no
job left in the journal starts from them (a re-roll of an image-to-image job shares its picture).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from engine import result_files
from engine.store import Store

log = logging.getLogger(__name__)
PRUNE_EVERY_S = 86400.0


async def prune(store: Store, keep_days: float, now: float, inputs: Path | None = None) -> int:
    """Delete what is older than ``keep_days`` (0: nothing); returns how many jobs went.
    ``inputs``: the folder of pictures users sent."""
    if keep_days <= 0:
        return 0
    paths = await store.prune(now - keep_days * 86400)
    await asyncio.to_thread(_delete_files, [p for p in paths if p])
    if inputs is not None:  # their age is the file's: wall-clock time, not the engine's clock
        named = {Path(path).name for path in await store.init_images()}
        await asyncio.to_thread(_delete_old_inputs, inputs, time.time() - keep_days * 86400,
                                named)
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


def _delete_old_inputs(folder: Path, before: float, named: set[str]) -> None:
    """Pictures older than ``before`` that no job names (also those of refused commands that a
    crash kept from being deleted at once)."""
    for file in folder.glob("*.png") if folder.is_dir() else []:
        if file.name not in named and file.stat().st_mtime < before:
            file.unlink(missing_ok=True)


def _delete_files(paths: list[str]) -> None:
    for path in paths:  # the journal names a job's first image; --n jobs have more beside it
        for file in result_files.siblings(path):
            file.unlink(missing_ok=True)
