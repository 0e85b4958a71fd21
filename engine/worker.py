"""The one thread that talks to the GPU.

Blocking work (loading, generating, PNG encoding) runs here, one call at a time, so the event loop
never blocks. Results come back through ``run_in_executor``; step events through
``loop.call_soon_threadsafe`` (aiosqlite's pattern).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from engine.backends.base import Backend, is_out_of_memory
from engine.errors import JobTimedOut, OutOfMemory
from engine.request import ImageRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


class Aborted(Exception):
    """Raised inside the backend's step callback when a running job is cancelled."""


class GpuWorker:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-worker")

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def load(self) -> None:
        await self.call(self.backend.load)

    async def close(self) -> None:
        try:
            await self.call(self.backend.close)
        finally:
            self._executor.shutdown(wait=True)

    def generate_blocking(
        self,
        request: ImageRequest,
        on_step: Callable[[int, int], None],
        abort: threading.Event,
        deadline: float,
    ) -> object:
        """Run one image; retry once after an out-of-memory error under a tighter plan."""

        def step(i: int, n: int) -> None:
            if abort.is_set():
                raise Aborted()
            if time.monotonic() > deadline:
                raise JobTimedOut("This image took too long and was stopped.")
            on_step(i, n)

        try:
            return self.backend.generate(request, step)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            log.warning("out of GPU memory (%s); retrying once with a tighter plan", exc)
            if not self.backend.reduce_memory():
                raise OutOfMemory(_OOM_MESSAGE) from exc
        try:
            return self.backend.generate(request, step)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise OutOfMemory(_OOM_MESSAGE) from exc
            raise


_OOM_MESSAGE = (
    "The GPU ran out of memory for this image; try a smaller --size, or ask again when the "
    "bot is less busy."
)

__all__ = ["Aborted", "GpuWorker"]
