"""Slash command descriptions in the user's Discord language: ``lstr`` marks a text for the
catalogues (its ``{fields}`` filled in English and again after translation) and
``GettextTranslator`` (set on the command tree) gives discord.py the Chinese for zh-CN and
zh-TW, which the command sync sends as ``description_localizations``. Command and option names
stay English: they are what users type."""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands

from bot import i18n

_TRANSLATED = (app_commands.TranslationContextLocation.command_description,
               app_commands.TranslationContextLocation.parameter_description,
               app_commands.TranslationContextLocation.choice_name)


def lstr(message: str, **fields: Any) -> app_commands.locale_str:
    """The English text (fields filled) that also carries its message id and fields."""
    return app_commands.locale_str(message.format(**fields) if fields else message,
                                   msgid=message, fields=fields)


class GettextTranslator(app_commands.Translator):
    async def translate(self, string: app_commands.locale_str, locale: discord.Locale,
                        context: app_commands.TranslationContextTypes) -> str | None:
        language = i18n.language_of(locale.value)
        if context.location not in _TRANSLATED or language in (None, "en"):
            return None  # names, and English: as written
        msgid = string.extras.get("msgid", string.message)
        text = i18n.translation(language).gettext(msgid)
        fields = string.extras.get("fields") or {}
        return text.format(**fields) if fields else text
