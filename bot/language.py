"""Which language a reply is in, and ``/language`` (admins) that sets one for a chat.

The chat's own language (set by an admin, kept in the journal) wins, then the user's language as
the platform reports it (Discord's interaction locale, Telegram's ``language_code``), then
``[bot] default_language``. The choice is made once per command or button press
(``bot.i18n.use``); everything said for that command, its job's progress and result included,
follows it.

A job keeps the language it was asked in (``origin.extra["language"]``): after a restart no live
message says whose language a recovered job's status and result are in, so its follower chooses
with that (``choose_for_job``), the chat's own language still first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bot import i18n, render
from engine.chat_languages import chat_key
from engine.config import Config
from engine.engine import Engine
from engine.job import Job

ORIGIN_KEY = "language"  # in Origin.extra: the language the job was asked in

# what an admin may type after /language
_WORDS: dict[str, str | None] = {"zh": "zh", "cn": "zh", "chinese": "zh", "中文": "zh",
                                 "en": "en", "english": "en", "auto": None}


async def for_chat(engine: Engine, config: Config, platform: str, chat_id: str | int,
                   user_language: str | None) -> str:
    """The language for a reply in this chat (not set: see ``choose``)."""
    return (await engine.chat_languages.get(chat_key(platform, chat_id))
            or i18n.language_of(user_language) or config.bot.default_language)


async def choose(engine: Engine, config: Config, platform: str, chat_id: str | int,
                 user_language: str | None) -> str:
    """The language for this command (and set for it: ``bot.i18n.use``)."""
    chosen = await for_chat(engine, config, platform, chat_id, user_language)
    i18n.use(chosen)
    return chosen


def remembered(extra: Mapping[str, Any]) -> dict[str, Any]:
    """A new job's ``Origin.extra`` with the language of the command that asks for it."""
    return {**extra, ORIGIN_KEY: i18n.current()}


async def choose_for_job(engine: Engine, config: Config, job: Job,
                         chat_id: str | int | None = None) -> str:
    """For a job followed with no live message (recovered after a restart), as a live message
    chooses: its chat's language, else the one it was asked in, else the default. ``chat_id``:
    the chat when the origin names none (the console's)."""
    asked_in = job.origin.extra.get(ORIGIN_KEY)
    return await choose(engine, config, job.origin.platform,
                        job.origin.chat_id if chat_id is None else chat_id,
                        asked_in if isinstance(asked_in, str) else None)


async def set_for_chat(engine: Engine, platform: str, chat_id: str | int, word: str) -> str:
    """``/language <word>`` in a chat: the answer, in the language the chat has now."""
    key = word.strip().lower()
    if key not in _WORDS:
        current = await engine.chat_languages.get(chat_key(platform, chat_id))
        return render.language_usage(current)
    language = _WORDS[key]
    await engine.chat_languages.set(chat_key(platform, chat_id), language)
    if language is not None:
        i18n.use(language)  # the answer already in the new language
    return render.language_set(language)
