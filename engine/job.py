"""A job: one accepted request, its status, and the events adapters render.

Events are kept in order on the job, so a late subscriber (an adapter that restarted its
watcher, a test) replays them from the start, then waits for new ones.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.errors import N_, GenerationFailed, JobCancelled, Phrase
from engine.moderation import Policy
from engine.request import ImageRequest, Origin, User

if TYPE_CHECKING:  # pragma: no cover
    from engine.engine import Engine


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class ResultImage:
    """One image of a job: its PNG (whose ``parameters`` chunk names its own seed), and what
    its chat's ``[moderation]`` policy says to do with it (ALLOW unless the NSFW check flagged
    it: then SPOILER or BLOCK)."""

    png: bytes
    seed: int
    path: str | None = None
    policy: Policy = Policy.ALLOW

    @property
    def blocked(self) -> bool:
        return self.policy is Policy.BLOCK

    @property
    def spoiler(self) -> bool:
        return self.policy is Policy.SPOILER


@dataclass(frozen=True)
class JobResult:
    """A finished job: its images (``--n`` of them, seeds in order) and what was used."""

    images: tuple[ResultImage, ...]
    request: ImageRequest
    model_name: str
    seconds: float

    @property
    def png(self) -> bytes:
        """The first image's PNG (the only one of a job of one)."""
        return self.images[0].png

    @property
    def path(self) -> str | None:
        return self.images[0].path

    @property
    def shown(self) -> tuple[ResultImage, ...]:
        """The images that may be posted (the NSFW check blocked none of them)."""
        return tuple(image for image in self.images if not image.blocked)

    @classmethod
    def single(cls, png: bytes, request: ImageRequest, model_name: str, seconds: float,
               path: str | None = None) -> JobResult:
        return cls((ResultImage(png, request.seed, path),), request, model_name, seconds)


@dataclass(frozen=True)
class Queued:
    position: int  # 1 = next to run


@dataclass(frozen=True)
class Started:
    pass


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    eta_s: float | None  # None until a step time is known


@dataclass(frozen=True)
class Finished:
    result: JobResult


@dataclass(frozen=True)
class Failed:
    reason: str  # a sentence the user can read (English; journalled)
    phrase: Phrase | None = field(default=None, compare=False)  # the same, in any language


@dataclass(frozen=True)
class Cancelled:
    by_owner: bool = True


JobEvent = Queued | Started | Progress | Finished | Failed | Cancelled


@dataclass(eq=False)
class Job:
    """Handle on one job (arq's ``Job`` shape): ``status``, ``events()``, ``result()``,
    ``cancel()``."""

    id: str
    user: User
    origin: Origin
    request: ImageRequest
    created_at: float
    seq: int = 0
    recovered: bool = False  # restored from the journal after a restart
    status: JobStatus = JobStatus.QUEUED
    error: str | None = None
    _result: JobResult | None = None
    _events: list[JobEvent] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _engine: Engine | None = None
    started_monotonic: float | None = None
    announced_position: int | None = None  # the last Queued position its watchers were told

    # -- reading -------------------------------------------------------------------------
    @property
    def events_so_far(self) -> list[JobEvent]:
        return list(self._events)

    async def events(self) -> AsyncIterator[JobEvent]:
        """Every event of this job, from the first, ending after the terminal one."""
        index = 0
        while True:
            while index < len(self._events):
                event = self._events[index]
                index += 1
                yield event
                if isinstance(event, (Finished, Failed, Cancelled)):
                    return
            self._changed.clear()
            if index < len(self._events):
                continue
            await self._changed.wait()

    async def wait(self) -> JobStatus:
        async for _ in self.events():
            pass
        return self.status

    async def result(self) -> JobResult:
        """The finished image; raises ``GenerationFailed`` or ``JobCancelled`` otherwise."""
        await self.wait()
        if self.status is JobStatus.FINISHED and self._result is not None:
            return self._result
        if self.status is JobStatus.CANCELLED:
            raise JobCancelled(N_("This job was cancelled."))
        raise GenerationFailed(self.error or N_("This image could not be made."))

    @property
    def result_now(self) -> JobResult | None:
        return self._result

    def position(self) -> int | None:
        """1-based place among waiting jobs, None once it has started."""
        if self._engine is None or self.status is not JobStatus.QUEUED:
            return None
        return self._engine.position_of(self)

    async def cancel(self, by: User | None = None) -> bool:
        """Cancel this job as its owner (or ``by``, who must be its owner or an admin)."""
        if self._engine is None:
            return False
        return await self._engine.cancel(self.id, by or self.user)

    # -- written by the engine -----------------------------------------------------------
    def _emit(self, event: JobEvent) -> None:
        if self.status.is_terminal:
            return
        if isinstance(event, Queued):
            self.announced_position = event.position
        if isinstance(event, Started):
            self.status = JobStatus.RUNNING
            self.started_monotonic = time.monotonic()
        elif isinstance(event, Finished):
            self.status = JobStatus.FINISHED
            self._result = event.result
        elif isinstance(event, Failed):
            self.status = JobStatus.FAILED
            self.error = event.reason
        elif isinstance(event, Cancelled):
            self.status = JobStatus.CANCELLED
        self._events.append(event)
        self._changed.set()
