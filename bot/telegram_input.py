"""Pictures sent to the Telegram bot to start from (image-to-image): which file, and its download.

A photo (or an image file) whose caption is ``/imagine …``, or ``/imagine …`` sent as a reply to
one. Telegram keeps a photo in several sizes; the largest is taken. Its announced size is checked
before the download; everything else about the picture is ``engine/input_image.py``'s.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any

from telegram import Message
from telegram.error import TelegramError
from telegram.ext import filters

from engine import input_image
from engine.config import Config, LimitsSection
from engine.grammar import ParsedCommand
from engine.request import ImageRequest

log = logging.getLogger(__name__)

COMMAND = re.compile(r"/imagine(?:@(\w+))?(?:\s|$)", re.IGNORECASE)  # group 1: the bot's name


class CaptionCommand(filters.MessageFilter):
    """A caption that starts with ``/imagine`` or ``/imagine@ThisBot`` (PTB's CommandHandler
    reads only a message's text, never a caption)."""

    def filter(self, message: Message) -> bool:
        match = COMMAND.match(message.caption or "")
        if match is None:
            return False
        name = match.group(1)
        return name is None or name.lower() == (message.get_bot().username or "").lower()


PICTURE_WITH_COMMAND = (filters.PHOTO | filters.Document.IMAGE) & CaptionCommand()


@dataclass(frozen=True)
class SentPicture:
    file_id: str
    size: int | None  # as Telegram announced it (it may not)


def picture_of(message: Message) -> SentPicture | None:
    """The picture ``message`` carries, or for an ``/imagine`` text, the one it replies to."""
    candidates = [message]
    if message.reply_to_message is not None and COMMAND.match(message.text or ""):
        candidates.append(message.reply_to_message)
    for candidate in candidates:
        if candidate.photo:
            largest = max(candidate.photo, key=lambda size: size.width * size.height)
            return SentPicture(largest.file_id, largest.file_size)
        document = candidate.document
        if document is not None and (document.mime_type or "").startswith("image/"):
            return SentPicture(document.file_id, document.file_size)
    return None


async def request_from(bot: Any, picture: SentPicture, parsed: ParsedCommand,
                       config: Config) -> ImageRequest:
    """Download ``picture`` and make the image-to-image request for ``parsed`` from it."""
    data = await download(bot, picture, config.limits)
    folder = input_image.inputs_folder(config.engine.output_dir)
    return await asyncio.to_thread(input_image.request_for, parsed, data, config.limits, folder)


async def download(bot: Any, picture: SentPicture, limits: LimitsSection) -> bytes:
    """The picture's bytes; its size is checked before each step that could fetch too much."""
    input_image.check_announced(picture.size, limits)
    try:
        file = await bot.get_file(picture.file_id)
        input_image.check_announced(file.file_size, limits)
        return bytes(await file.download_as_bytearray())
    except TelegramError as exc:
        log.warning("telegram: could not download a picture: %s", exc)
        raise input_image.unavailable() from None
