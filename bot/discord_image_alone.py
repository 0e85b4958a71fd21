"""U: one image of a finished job posted alone, full size, with its caption and its own
variation buttons. The image is read back from the file the engine saved (so it works after a
restart, and as long as retention keeps the file). The NSFW check (``[moderation]``) judges it
again for the chat it is posted in: a spoiler there, or not posted.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import discord

from bot.discord_reply import result_caption
from bot.discord_views import alone_view
from bot.media import fit_under
from engine import variants
from engine.engine import Engine
from engine.job import JobResult
from engine.moderation import Policy
from engine.request import Origin
from engine.store import JobRecord


async def policy(engine: Engine, interaction: discord.Interaction, record: JobRecord,
                 path: Path) -> Policy:
    """The NSFW policy for this image in the chat the button was pressed in."""
    if not engine.moderator.enabled:
        return Policy.ALLOW
    png = await asyncio.to_thread(path.read_bytes)
    chat = Origin("discord", chat_id=str(interaction.channel_id),
                  extra={"guild_id": str(interaction.guild_id or "")})
    return await engine.policy_of(record.job_id, chat, png)


def message(record: JobRecord, index: int, path: Path, limit: int,
            spoiler: bool = False) -> tuple[str, discord.File, discord.ui.View]:
    """The text, file and buttons of image ``index`` posted alone (blocking: reads the file)."""
    request = variants.alone(record.request, index)
    png = path.read_bytes()  # its parameters chunk already names its own seed
    text = result_caption(JobResult.single(png, request, "", 0.0, str(path)),
                          record.user.display_name)
    data, ext = fit_under(png, limit)  # the PNG itself unless the guild's limit is smaller
    upload = discord.File(io.BytesIO(data), filename=f"{record.job_id}-{request.seed}.{ext}",
                          spoiler=spoiler)
    return text, upload, alone_view(record.job_id, index + 1)
