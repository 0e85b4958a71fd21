"""Every error the engine raises on purpose.

    EngineError                 base; ``str(err)`` is a sentence a chat user can read
    ├── InvalidCommand          the /imagine text could not be parsed or is out of range
    ├── AccessDenied            banned word, channel not allowed, not an admin
    ├── RateLimited             user spent their images for the window (``retry_at``)
    ├── QueueFull               per-user or global queue cap reached
    ├── JobNotFound             no such job, or not the caller's
    ├── EngineClosed            the engine is shutting down or paused
    ├── NoWorkerCanRun          a cluster: no GPU worker online can run this job (size, --n, style)
    ├── JobCancelled            ``Job.result()`` of a cancelled job
    └── GenerationFailed        the backend failed this one job
        ├── OutOfMemory         the GPU ran out of memory (after the retry)
        └── JobTimedOut         the job ran past ``engine.job_timeout_s``

Adapters catch ``EngineError`` once, log it, and show ``str(err)`` to the user.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: the message is safe to show to the user who caused it."""


class InvalidCommand(EngineError):
    pass


class AccessDenied(EngineError):
    pass


class RateLimited(EngineError):
    def __init__(self, message: str, retry_at: float) -> None:
        super().__init__(message)
        self.retry_at = retry_at


class QueueFull(EngineError):
    pass


class JobNotFound(EngineError):
    pass


class EngineClosed(EngineError):
    pass


class NoWorkerCanRun(EngineError):
    pass


class JobCancelled(EngineError):
    pass


class GenerationFailed(EngineError):
    pass


class OutOfMemory(GenerationFailed):
    pass


class JobTimedOut(GenerationFailed):
    pass
