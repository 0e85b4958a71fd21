"""The tasks an adapter runs to follow jobs to their answer in the chat.

A shutdown lets the ones whose job has ended finish posting (their answer is on its way:
cancelling it would leave a finished image unposted, or posted twice after the restart when
an upload was cut mid-request), within what is left of the grace; the others, following jobs
that are still queued, are cancelled (the journal brings those jobs back after the restart).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from engine.job import Job

log = logging.getLogger(__name__)


class Followers:
    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[None], Job] = {}

    def spawn(self, coro: Coroutine[Any, Any, None], job: Job, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks[task] = job
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def finish_answers(self, timeout: float) -> int:
        """Wait up to ``timeout`` for the followers of ended jobs (posting their answer);
        returns how many were still posting when the time ran out."""
        posting = [task for task, job in self._tasks.items() if job.status.is_terminal]
        if not posting:
            return 0
        _, pending = await asyncio.wait(posting, timeout=max(0.0, timeout))
        if pending:
            log.warning("%d answers still being posted at shutdown; they stay undelivered in "
                        "the journal and are posted after the restart", len(pending))
        return len(pending)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_all(self) -> None:
        """Until every followed job has been answered (tests and the console's end of input)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
