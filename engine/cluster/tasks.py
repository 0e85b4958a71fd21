"""Stopping the cluster's background tasks for sure.

Python 3.11's ``asyncio.wait_for``, which nats-py uses for its requests, can swallow a cancel
(when the awaited call finishes in the same turn, the result wins and the cancel is lost;
fixed in 3.12). A loop that reads the workers' bucket every few seconds then runs on, and a
plain ``cancel(); gather()`` waits for it for ever: a bot's clean shutdown hung so in CI. So the
cancel is repeated until the task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

REPEAT_S = 1.0  # how long a cancel is given before it is sent again


async def cancel_until_done(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and return once every one has ended (their errors are not raised)."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=REPEAT_S)
    await asyncio.gather(*tasks, return_exceptions=True)
