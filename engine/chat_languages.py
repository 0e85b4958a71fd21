"""The language an admin set for one chat (``/language zh|en|auto``), kept in the journal.

A chat is a platform-neutral key such as ``discord:<channel id>`` or ``telegram:<chat id>``;
the language is a plain code ("en", "zh"). Read once from the journal, then from memory: every
command asks, and only admins change it.
"""

from __future__ import annotations

from engine.store import Store


def chat_key(platform: str, chat_id: str | int) -> str:
    return f"{platform}:{chat_id}"


class ChatLanguages:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[str, str] | None = None

    async def get(self, chat: str) -> str | None:
        """The chat's language, or None when its users' own languages apply."""
        if self._known is None:
            async with self.store.db.execute(
                    "SELECT chat_key, language FROM chat_languages") as cursor:
                self._known = {row[0]: row[1] for row in await cursor.fetchall()}
        return self._known.get(chat)

    async def set(self, chat: str, language: str | None) -> None:
        """``None`` goes back to each user's own language."""
        await self.get(chat)  # loaded first, so the cache stays whole
        assert self._known is not None
        if language is None:
            await self.store.db.execute("DELETE FROM chat_languages WHERE chat_key = ?", (chat,))
            self._known.pop(chat, None)
            return
        await self.store.db.execute(
            "INSERT INTO chat_languages (chat_key, language) VALUES (?, ?)"
            " ON CONFLICT (chat_key) DO UPDATE SET language = excluded.language",
            (chat, language))
        self._known[chat] = language
