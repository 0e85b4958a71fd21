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
message is a ``Phrase``, a gettext id (marked ``N_``, or a plural pair marked ``N_plural``)
with ``{name}`` fields; ``bot/render.py`` says it with the reader's catalogue
(``err.phrase.say(gettext, ngettext)``), and ``str(err)`` stays the English sentence for logs.

A field is a number, an option as the user typed it (``--steps``), the user's own text, or
itself a ``Phrase``: a part of the sentence whose words vary ("the seed option", "this hour",
"12 minutes"), said in the reader's language before it is filled in. Sentences stay whole
message ids; such parts are small ids of their own, never English glued together.
"""

from __future__ import annotations

from collections.abc import Callable

Gettext = Callable[[str], str]
Ngettext = Callable[[str, str, int], str]


def N_(message: str) -> str:
    """Marks an English message id for the catalogues (``bot/i18n``); translated when shown."""
    return message


def N_plural(singular: str, plural: str) -> tuple[str, str]:
    """Marks a singular/plural pair of message ids (``ngettext``'s); ``Phrase(pair, count)``
    picks one by the count."""
    return singular, plural


def _english(message: str) -> str:
    return message


def _english_plural(singular: str, plural: str, n: int) -> str:
    return singular if n == 1 else plural


class Phrase:
    """Words said in the reader's language when shown; ``str()`` is the English.

    ``message``: a message id, or a plural pair (``N_plural``) with the ``count`` that picks
    one; ``params``: its ``{name}`` fields (a ``Phrase`` among them is said first)."""

    def __init__(self, message: str | tuple[str, str], count: int | None = None, /,
                 **params: object) -> None:
        if isinstance(message, tuple) and count is None:
            raise TypeError("a plural message needs the count that picks its form")
        self.message, self.count, self.params = message, count, params
        self.capital = False

    def as_sentence(self) -> Phrase:
        """Said with a capital first letter: the sentence may start with a part such as
        'the seed option' (a no-op for Chinese)."""
        self.capital = True
        return self

    def say(self, gettext: Gettext = _english, ngettext: Ngettext = _english_plural) -> str:
        if isinstance(self.message, tuple):
            text = ngettext(*self.message, self.count or 0)
        else:  # gettext("") would be the catalogue's header
            text = gettext(self.message) if self.message else ""
        if self.params:
            text = text.format(**{name: value.say(gettext, ngettext)
                                  if isinstance(value, Phrase) else value
                                  for name, value in self.params.items()})
        return text[:1].upper() + text[1:] if self.capital else text

    def __str__(self) -> str:
        return self.say()

    def __repr__(self) -> str:
        return f"Phrase({self.say()!r})"


class EngineError(Exception):
    """Base class: the message is safe to show to the user who caused it.

    ``message``: a message id with its ``params``, or a ready ``Phrase``."""

    def __init__(self, message: str | Phrase = "", /, **params: object) -> None:
        self.phrase = message if isinstance(message, Phrase) else Phrase(message, **params)
        super().__init__(str(self.phrase))


class InvalidCommand(EngineError):
    pass


class AccessDenied(EngineError):
    pass


class RateLimited(EngineError):
    def __init__(self, message: str | Phrase, retry_at: float, **params: object) -> None:
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
