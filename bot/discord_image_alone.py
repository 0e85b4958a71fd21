"""U: one image of a finished job posted alone, full size, with its caption and its own
variation buttons. The image is read back from the file the engine saved (so it works after a
restart, and as long as retention keeps the file).
"""

from __future__ import annotations

import io
from pathlib import Path

import discord

from bot.discord_reply import result_caption
from bot.discord_views import alone_view
from bot.media import fit_under
from engine import variants
from engine.errors import InvalidCommand
from engine.job import JobResult
from engine.store import JobRecord


def path_of(record: JobRecord, index: int) -> str | None:
    """The file of image ``index`` (0-based) of a finished job; None if the bot no longer
    keeps it (or the job never finished)."""
    if record.status != "finished":
        return None
    try:
        return variants.image_of(record.result_path, record.request, index)
    except InvalidCommand:
        return None


def message(record: JobRecord, index: int, path: str,
            limit: int) -> tuple[str, discord.File, discord.ui.View]:
    """The text, file and buttons of image ``index`` posted alone (blocking: reads the file)."""
    request = variants.alone(record.request, index)
    png = Path(path).read_bytes()  # its parameters chunk already names its own seed
    text = result_caption(JobResult.single(png, request, "", 0.0, path),
                          record.user.display_name)
    data, ext = fit_under(png, limit)  # the PNG itself unless the guild's limit is smaller
    upload = discord.File(io.BytesIO(data), filename=f"{record.job_id}-{request.seed}.{ext}")
    return text, upload, alone_view(record.job_id, index + 1)
