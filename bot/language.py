"""Which language a reply is in, and ``/language`` (admins) that sets one for a chat.

The chat's own language (set by an admin, kept in the journal) wins, then the user's language as
the platform reports it (Discord's interaction locale, Telegram's ``language_code``), then
``[bot] default_language``. The choice is made once per command or button press
(``bot.i18n.use``); everything said for that command, its job's progress and result included,
follows it.
"""

from __future__ import annotations

from bot import i18n, render
from engine.chat_languages import chat_key
from engine.config import Config
from engine.engine import Engine

# what an admin may type after /language
_WORDS: dict[str, str | None] = {"zh": "zh", "cn": "zh", "chinese": "zh", "中文": "zh",
                                 "en": "en", "english": "en", "auto": None}


async def choose(engine: Engine, config: Config, platform: str, chat_id: str | int,
                 user_language: str | None) -> str:
    """The language for this command (and set for it: ``bot.i18n.use``)."""
    chosen = (await engine.chat_languages.get(chat_key(platform, chat_id))
              or i18n.language_of(user_language) or config.bot.default_language)
    i18n.use(chosen)
    return chosen


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
