"""Which chat a job counts against as a whole (``[rate_limit] per_chat_images_per_window``).

A Discord server (guild) or a Telegram group is one key, shared by everyone in it; a private
chat, a Discord DM and the console have none. The key is stored with the job (``jobs.group_key``,
indexed), so the chat's use is one range read, never a scan of the origin's JSON.
"""

from __future__ import annotations

from engine.request import Origin


def group_key(origin: Origin) -> str:
    """'discord:<guild id>', 'telegram:<group chat id>', or '' (no shared cap)."""
    if origin.platform == "discord":
        guild = str(origin.extra.get("guild_id") or "")
        return f"discord:{guild}" if guild else ""
    # Telegram's group, supergroup and channel ids are negative; a private chat's is the user's.
    if origin.platform == "telegram" and origin.chat_id.startswith("-"):
        return f"telegram:{origin.chat_id}"
    return ""


def chat_word(key: str) -> str:
    """What the chat of ``key`` is called in a refusal: 'server' (Discord) or 'group'."""
    return "server" if key.startswith("discord:") else "group"
