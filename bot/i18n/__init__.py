"""The bot's words in the reader's language (English and Simplified Chinese).

Texts are gettext message ids (English) marked with ``_()``/``ngettext()`` in ``bot/render.py``
and ``N_()``/``N_plural()`` in the engine, whose errors carry them as ``Phrase``s
(``engine/errors.py``); ``locale/<lang>/LC_MESSAGES/bot.po`` holds each language's words
(``catalog.py`` compiles them). The language of a reply is a context variable: an adapter sets it
once per command or button press (``use``), and the tasks that follow the job inherit it; a job
recovered after a restart has no command, so its follower sets its chat's
(``bot.language.choose_for_job``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gettext as _gettext
from collections.abc import Iterator

from bot.i18n.catalog import load

LANGUAGES = ("en", "zh")
DEFAULT = "en"

_current: contextvars.ContextVar[str] = contextvars.ContextVar("language", default=DEFAULT)


def language_of(code: str | None) -> str | None:
    """A platform's language code as ours: Discord's 'zh-CN'/'zh-TW', Telegram's 'zh',
    'zh-hans', 'zh-cn' are Chinese, 'en-US' English; anything else None (the default then)."""
    code = (code or "").strip().lower().replace("_", "-")
    if code == "zh" or code.startswith("zh-"):
        return "zh"
    if code == "en" or code.startswith("en-"):
        return "en"
    return None


def use(language: str) -> None:
    """The language of the replies the current task (and the tasks it starts) builds."""
    _current.set(language if language in LANGUAGES else DEFAULT)


@contextlib.contextmanager
def using(language: str) -> Iterator[None]:
    """The language of what is built inside the block, the task's own afterwards (a reply for
    another chat, such as a start-up notice, without changing the task's language)."""
    token = _current.set(language if language in LANGUAGES else DEFAULT)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> str:
    return _current.get()


@functools.cache
def translation(language: str) -> _gettext.NullTranslations:
    return load(language)


def gettext(message: str) -> str:
    return translation(_current.get()).gettext(message)


def ngettext(singular: str, plural: str, n: int) -> str:
    return translation(_current.get()).ngettext(singular, plural, n)


def _(message: str) -> str:  # the usual short name, for render.py
    return gettext(message)


def N_(message: str) -> str:
    """Marks a message id for the catalogues where it is translated later."""
    return message
