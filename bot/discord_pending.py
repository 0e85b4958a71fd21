"""Discord interactions written down before they are answered, and answered after a crash.

The adapter writes an interaction to the journal (``engine.pending``) as the first thing it does
with an ``/imagine`` or a Re-roll/More press, and removes it once its job (or its refusal) is
journalled and sent. A SIGKILL in between used to leave the user's "thinking…" up for good.
At start-up each left-over one whose token still lives is told "the bot restarted, please ask
again" by an edit of its original response through the interaction webhook: an edit of the same
message, so a second crash while answering shows the sentence once. One that was never deferred
has no original response to edit; Discord has told that user "The application did not respond".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import discord

from bot import i18n, render
from bot.discord_reply import TOKEN_LIFETIME_S
from engine.pending import PendingInteraction, PendingInteractions

log = logging.getLogger(__name__)
ANSWER_MARGIN_S = 10.0  # an edit takes a moment; a token about to expire is not worth a try


def request_key(interaction: discord.Interaction) -> str:
    """The key of the job this interaction queues: left-over rows with a job are not lost."""
    return f"discord:interaction:{interaction.id}"


def pending_of(interaction: discord.Interaction) -> PendingInteraction:
    return PendingInteraction(
        request_key=request_key(interaction), application_id=str(interaction.application_id),
        token=interaction.token, channel_id=str(interaction.channel_id or ""),
        received_at=interaction.created_at.timestamp())


async def answer_left_over(client: discord.Client, pending: PendingInteractions,
                           now: float, *,
                           language_of: Callable[[str], Awaitable[str]] | None = None) -> int:
    """Tell the users of interactions a crash left unanswered to ask again; forget them all.
    Returns how many were told. ``language_of``: a channel id's language (the user's own
    locale is not kept), else the task's."""
    told = 0
    for row in await pending.left_over():
        if now < row.received_at + TOKEN_LIFETIME_S - ANSWER_MARGIN_S:
            language = i18n.current() if language_of is None else \
                await language_of(row.channel_id)
            with i18n.using(language):
                text = render.restarted_ask_again()
            told += await _ask_again(client, row, text)
        else:
            log.info("interaction %s is too old to answer after the restart", row.request_key)
        await pending.remove(row.request_key)
    return told


async def _ask_again(client: discord.Client, row: PendingInteraction, text: str) -> bool:
    webhook = discord.Webhook.partial(int(row.application_id), row.token, client=client)
    try:
        # "@original" names the interaction's own response, the "thinking…" it deferred
        # (Discord's "Edit Original Interaction Response" is this webhook route).
        await webhook.edit_message("@original", content=text,  # type: ignore[arg-type]
                                   allowed_mentions=discord.AllowedMentions.none())
    except discord.NotFound:
        log.info("interaction %s was never acknowledged; nothing to answer", row.request_key)
        return False
    except discord.HTTPException as exc:  # never the token: the exception carries no URL
        log.warning("could not tell interaction %s to ask again: %s", row.request_key, exc)
        return False
    log.info("told interaction %s that the bot restarted", row.request_key)
    return True
