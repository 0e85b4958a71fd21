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
from typing import TYPE_CHECKING, Protocol, TypeVar

from engine.backends.base import Backend, is_out_of_memory
from engine.errors import N_, JobTimedOut, OutOfMemory
from engine.request import ImageRequest

if TYPE_CHECKING:  # pragma: no cover
    from engine.cluster.messages import WorkerInfo

log = logging.getLogger(__name__)
T = TypeVar("T")


class Aborted(Exception):
    """Raised inside the backend's step callback when a running job is cancelled."""


class StopSignal(threading.Event):
    """Set to stop a running job at its next step. ``reason`` says why: "cancel" (by a user,
    or an admin: ``by_owner`` False) wins over "shutdown", which puts the job back in line."""

    def __init__(self) -> None:
        super().__init__()
        self.reason: str | None = None
        self.by_owner = True

    def stop(self, reason: str) -> None:
        if self.reason != "cancel":
            self.reason = reason
        self.set()


class Runner(Protocol):
    """Where the engine's jobs run: ``GpuWorker`` (this process's GPU) or a cluster's
    ``RemoteWorker`` (engine/cluster/dispatch.py). ``generate`` returns the job's images, as
    PIL images or as PNG bytes made already; it raises ``Aborted`` once ``abort`` is set.
    ``claim`` takes room for one job (the engine then runs it) and ``release`` gives it back;
    ``check_runnable`` refuses at submit a job nothing here could ever run."""

    async def load(self) -> None: ...

    async def close(self) -> None: ...

    def abandon(self) -> None: ...

    def has_room(self, running: int) -> bool: ...

    def claim(self, job_id: str, request: ImageRequest, running: int) -> bool: ...

    def release(self, job_id: str) -> None: ...

    def check_runnable(self, request: ImageRequest) -> None: ...

    def workers(self) -> list[WorkerInfo]: ...

    def on_room(self, wake: Callable[[], None]) -> None: ...

    async def generate(self, job_id: str, request: ImageRequest,
                       on_step: Callable[[int, int], None], abort: StopSignal,
                       deadline: float) -> object: ...


class GpuWorker:
    abandoned = False  # a worker of this process was left hung at shutdown

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-worker")

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def load(self) -> None:
        await self.call(self.backend.load)

    def has_room(self, running: int) -> bool:
        """One job at a time on this process's GPU."""
        return running == 0

    def claim(self, job_id: str, request: ImageRequest, running: int) -> bool:
        """Any job fits here (the grammar kept it within this GPU's limits)."""
        return self.has_room(running)

    def release(self, job_id: str) -> None:
        """Room here is the engine's count of running jobs: nothing to give back."""

    def check_runnable(self, request: ImageRequest) -> None:
        """Nothing to refuse: the grammar checked the request against this GPU's limits."""

    def workers(self) -> list[WorkerInfo]:
        """No cluster: this process's GPU is the only one."""
        return []

    def on_room(self, wake: Callable[[], None]) -> None:
        """Room here changes only when a job ends, which the engine sees itself."""

    async def generate(self, job_id: str, request: ImageRequest,
                       on_step: Callable[[int, int], None], abort: StopSignal,
                       deadline: float) -> object:
        """The job's images (PIL images: the engine encodes them) made on this thread."""
        return await self.call(self.generate_blocking, request, on_step, abort, deadline)

    async def close(self) -> None:
        try:
            await self.call(self.backend.close)
        finally:
            self._executor.shutdown(wait=True)

    def abandon(self) -> None:
        """At shutdown, with a step that does not return: leave the thread to the process's
        exit (``GpuWorker.abandoned`` tells the entry point not to wait for it)."""
        GpuWorker.abandoned = True
        self._executor.shutdown(wait=False, cancel_futures=True)

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
                raise JobTimedOut(N_("This image took too long and was stopped."))
            on_step(i, n)

        result = self._attempt(request, step)
        if not isinstance(result, _OutOfMemory):
            return result
        # Re-planning happens here, after the except block has let go of the traceback (it
        # holds every tensor of the failed pass's frames).
        log.warning("out of GPU memory (%s); retrying once with a tighter plan", result.text)
        if not self.backend.reduce_memory():
            raise OutOfMemory(_OOM_MESSAGE)
        result = self._attempt(request, step)
        if isinstance(result, _OutOfMemory):
            self._recover()  # nothing of the failed retry stays for the next job
            raise OutOfMemory(_OOM_MESSAGE)
        return result

    def _recover(self) -> None:
        recover = getattr(self.backend, "recover_after_failure", None)
        if recover is not None:
            recover()

    def _attempt(self, request: ImageRequest, step: Callable[[int, int], None]) -> object:
        """The image, or ``_OutOfMemory``; any other error propagates. After any failure the
        backend cleans up what the failed pass left (outside the except block)."""
        failure: BaseException | None = None
        out_of_memory: _OutOfMemory | None = None
        try:
            return self.backend.generate(request, step)
        except Exception as exc:
            if is_out_of_memory(exc):
                out_of_memory = _OutOfMemory(_first_line(exc))
            else:
                failure = exc
        if out_of_memory is None:
            self._recover()  # reduce_memory does it for an out-of-memory error
        if failure is not None:
            raise failure
        return out_of_memory


class _OutOfMemory:
    """An out-of-memory error as text, so that no frame of the failed pass stays alive."""

    def __init__(self, text: str) -> None:
        self.text = text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


_OOM_MESSAGE = N_(
    "The GPU ran out of memory for this image; try a smaller --size, or ask again when the "
    "bot is less busy."
)

__all__ = ["Aborted", "GpuWorker", "Runner", "StopSignal"]
