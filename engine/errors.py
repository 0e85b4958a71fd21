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

Adapters catch ``EngineError`` once, log it, and show it to the user in their language: the
message is a gettext id (marked ``N_``) with ``{name}`` fields filled from ``params``
(``bot/render.py`` translates ``msgid`` and fills it again); ``str(err)`` stays the English
sentence for logs.
"""

from __future__ import annotations


def N_(message: str) -> str:
    """Marks an English message id for the catalogues (``bot/i18n``); translated when shown."""
    return message


class EngineError(Exception):
    """Base class: the message is safe to show to the user who caused it."""

    def __init__(self, message: str = "", /, **params: object) -> None:
        super().__init__(message.format(**params) if params else message)
        self.msgid = message
        self.params = params


class InvalidCommand(EngineError):
    pass


class AccessDenied(EngineError):
    pass


class RateLimited(EngineError):
    def __init__(self, message: str, retry_at: float, **params: object) -> None:
        super().__init__(message, **params)
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
