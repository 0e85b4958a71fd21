"""Commands received but not yet answered, written down in the journal before anything else.

Two kinds: ``PendingInteractions`` (a command whose only way back is a short-lived handle) and
``PendingReplies`` (an answer decided, a refusal or an error, not yet posted).

Some platforms can answer a command only through a short-lived handle (a Discord interaction's
token, valid 15 minutes). The adapter writes one down here as the first thing it does with a
command, and removes it once the command's job (or its refusal) is journalled and answered. A row
left over after a crash is a user still looking at "thinking…": the next start tells them to
ask again, unless the job did reach the journal (its ``request_key`` is on a job row), in which
case the recovered job answers them and the row simply goes.

Plain strings only: the engine knows nothing of the chat library the handle belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.store import Store


@dataclass(frozen=True)
class PendingInteraction:
    request_key: str  # the key the command's job will carry in the journal
    application_id: str
    token: str = field(repr=False)  # a secret while it lives: never in a repr, so never logged
    channel_id: str = ""
    received_at: float = 0.0  # when the platform created it (its token's lifetime starts then)


class PendingInteractions:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(self, pending: PendingInteraction) -> None:
        await self.store.db.execute(
            "INSERT OR REPLACE INTO pending_interactions (request_key, application_id, token,"
            " channel_id, received_at) VALUES (?, ?, ?, ?, ?)",
            (pending.request_key, pending.application_id, pending.token, pending.channel_id,
             pending.received_at),
        )

    async def remove(self, request_key: str) -> None:
        await self.store.db.execute("DELETE FROM pending_interactions WHERE request_key = ?",
                                    (request_key,))

    async def left_over(self) -> list[PendingInteraction]:
        """The rows whose job never reached the journal, oldest first; the others are
        deleted (their job is recovered and answers the user)."""
        await self.store.db.execute(
            "DELETE FROM pending_interactions WHERE request_key IN"
            " (SELECT request_key FROM jobs WHERE request_key IS NOT NULL)")
        async with self.store.db.execute(
            "SELECT request_key, application_id, token, channel_id, received_at"
            " FROM pending_interactions ORDER BY received_at"
        ) as cursor:
            return [PendingInteraction(*row) for row in await cursor.fetchall()]


@dataclass(frozen=True)
class PendingReply:
    """An answer to a command, to post (again) if the bot stops before it is out."""

    reply_key: str  # unique per command, e.g. "telegram:<chat>:<message>"
    platform: str
    chat_id: str
    reply_to: str  # the command's message id
    text: str
    thread_id: str = ""
    created_at: float = 0.0
    markup: str = ""  # buttons, as the platform's JSON ("" = none)


class PendingReplies:
    """Answers the adapter has decided and confirmed the command for, until they are posted."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(self, reply: PendingReply) -> None:
        await self.store.db.execute(
            "INSERT OR REPLACE INTO pending_replies (reply_key, platform, chat_id, reply_to,"
            " thread_id, text, created_at, markup) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (reply.reply_key, reply.platform, reply.chat_id, reply.reply_to, reply.thread_id,
             reply.text, reply.created_at, reply.markup),
        )

    async def remove(self, reply_key: str) -> None:
        await self.store.db.execute("DELETE FROM pending_replies WHERE reply_key = ?",
                                    (reply_key,))

    async def take(self, platform: str, since: float) -> list[PendingReply]:
        """The platform's answers not posted before the last stop, made after ``since``,
        oldest first; older ones are deleted (an answer an hour late confuses more than it
        helps)."""
        await self.store.db.execute(
            "DELETE FROM pending_replies WHERE platform = ? AND created_at < ?", (platform, since))
        async with self.store.db.execute(
            "SELECT reply_key, platform, chat_id, reply_to, text, thread_id, created_at, markup"
            " FROM pending_replies WHERE platform = ? ORDER BY created_at", (platform,)
        ) as cursor:
            return [PendingReply(*row) for row in await cursor.fetchall()]
