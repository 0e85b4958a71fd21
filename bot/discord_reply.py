"""Following one job into Discord: progress edits of the reply, then the image(s).

While the interaction token lives (15 minutes) the bot edits its own deferred response: queue
position and progress, then the PNG (a job of ``--n N``: its N files in one message) with its
caption and buttons. After that, and for jobs
recovered after a restart, the result is posted to the channel as a normal message that mentions
the user (and only that user). A progress edit that fails is logged and forgotten; the final
upload goes through ``bot.delivery.deliver`` (retries, then the journal's undelivered path).

A retried upload never shows twice. The interaction path edits the same original response, so
doing it again changes nothing. A channel post carries a nonce made from the job id with
``enforce_nonce`` (discord.py sends it with every nonce): Discord answers a second post with the
same nonce, within a few minutes, with the message the first one made. A channel post whose
answer was lost (a timeout after the upload went out, a dropped connection) is looked for in
the channel's recent messages before it is posted again, and so is a result recovered after a
restart: the process before may have posted it just before it died.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import discord

from bot import render
from bot.delivery import RetryPolicy, deliver
from bot.discord_views import TEMPLATE, job_view, result_view
from bot.media import fit_all
from engine.engine import Engine
from engine.job import Cancelled, Failed, Finished, Job, JobResult, ResultImage
from engine.moderation import delivered_blocked
from engine.request import Origin

log = logging.getLogger(__name__)
DEFAULT_FILE_LIMIT = 10 * 1024 * 1024  # Discord's limit for a guild without boosts
TOKEN_LIFETIME_S = 15 * 60
TOKEN_MARGIN_S = 60.0  # stop using a token a minute early: an upload can take that long
# discord.py would wait for aiohttp's 5 minutes; past this an answer is taken as lost and the
# post tried again (safely: see above). Room for a 25 MB upload on a slow line.
POST_TIMEOUT_S = 120.0
RECENT_MESSAGES = 50  # how far back in a channel a lost post is looked for
SPOILER = "SPOILER_"  # discord.py's (and Discord's) mark of a spoiler attachment's name
Upload = tuple[bytes, str]  # a file's bytes and its name


@dataclass
class Reply:
    """Where a job's messages go: the interaction's response while its token lives, else the
    channel."""

    channel_id: int
    user_id: int
    filesize_limit: int = DEFAULT_FILE_LIMIT
    interaction: discord.Interaction | None = None
    note: str = ""  # e.g. "the --flags in your prompt were used instead of ..."
    look_first: bool = False  # a post may have landed unseen: look in the channel before posting

    @classmethod
    def for_interaction(cls, interaction: discord.Interaction, note: str = "") -> Reply:
        return cls(channel_id=interaction.channel_id or 0, user_id=interaction.user.id,
                   filesize_limit=interaction.filesize_limit, interaction=interaction, note=note)

    @classmethod
    def for_origin(cls, origin: Origin, user_id: str, *, look_first: bool = True) -> Reply:
        """For a job restored from the journal: no token any more, so the channel.
        ``look_first``: its result may have been posted by the process before (it had ended)."""
        limit = origin.extra.get("filesize_limit") or DEFAULT_FILE_LIMIT
        return cls(channel_id=int(origin.chat_id), user_id=int(user_id), filesize_limit=int(limit),
                   look_first=look_first)

    def token_alive(self, now: float) -> bool:
        if self.interaction is None:
            return False
        expires = self.interaction.created_at.timestamp() + TOKEN_LIFETIME_S - TOKEN_MARGIN_S
        return now < expires

    def with_note(self, text: str) -> str:
        return f"{text}\n{self.note}" if self.note else text


class ProgressEditor:
    """Shows the latest status in the reply, at most one edit per ``interval_s``.

    A background pump takes the newest text after each pause, so a burst of events costs one
    edit and the last state is always shown (a throttle that drops the last update would leave
    "number 3 in line" up while the job is next). ``close`` waits for an edit in flight, so no
    progress edit can land after the result.
    """

    def __init__(self, edit: Callable[[str, bool], Awaitable[None]], interval_s: float) -> None:
        self._edit = edit
        self.interval_s = interval_s
        self._latest: str | None = None
        self._shown: str | None = None
        self._changed = asyncio.Event()
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.edits = 0

    def show(self, text: str) -> None:
        self._latest = text
        self._changed.set()
        if self._task is None:
            self._task = asyncio.create_task(self._pump(), name="discord-progress")

    async def close(self) -> None:
        self._closed.set()
        self._changed.set()
        if self._task is not None:
            await self._task

    async def _pump(self) -> None:
        while not self._closed.is_set():
            await self._changed.wait()
            self._changed.clear()
            if self._closed.is_set() or self._latest is None or self._latest == self._shown:
                continue
            text = self._latest
            try:
                await self._edit(text, self.edits == 0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a progress edit never fails the job
                log.warning("progress edit failed (ignored): %s", exc)
            self._shown = text
            self.edits += 1
            try:  # the pause between edits; close() ends it early
                await asyncio.wait_for(self._closed.wait(), self.interval_s)
            except TimeoutError:
                pass


class Follower:
    """Carries each job's events to its ``Reply``."""

    def __init__(self, client: discord.Client, engine: Engine, *, interval_s: float,
                 policy: RetryPolicy, clock: Callable[[], float],
                 post_timeout_s: float = POST_TIMEOUT_S) -> None:
        self.client = client
        self.engine = engine
        self.interval_s = interval_s
        self.policy = policy
        self.clock = clock
        self.post_timeout_s = post_timeout_s

    async def follow(self, job: Job, reply: Reply) -> None:
        editor = ProgressEditor(lambda text, first: self._edit(job, reply, text, first),
                                self.interval_s)
        try:
            async for event in job.events():
                text = render.job_status(event, job.request)
                if text is not None:
                    editor.show(reply.with_note(text))
                else:
                    await editor.close()
                    await self._conclude(job, reply, event)
        finally:
            await editor.close()

    async def _edit(self, job: Job, reply: Reply, text: str, first: bool) -> None:
        if reply.interaction is None or not reply.token_alive(self.clock()):
            return  # no progress without a token: the channel gets the result only
        if first:  # the first edit brings the Cancel button
            await reply.interaction.edit_original_response(content=text,
                                                           view=job_view(job.id, "cancel"))
        else:
            await reply.interaction.edit_original_response(content=text)

    async def _conclude(self, job: Job, reply: Reply, event: object) -> None:
        if isinstance(event, Finished):
            await deliver(self.engine, job, lambda: self._send_result(job, reply, event.result),
                          policy=self.policy, is_permanent=is_permanent)
        elif isinstance(event, Failed):
            text = reply.with_note(render.failed(event))
            await deliver(self.engine, job, lambda: self._post(job.id, reply, text, [], None),
                          policy=self.policy, is_permanent=is_permanent)
        elif isinstance(event, Cancelled) and reply.token_alive(self.clock()):
            try:
                await self._post(job.id, reply, render.cancelled(event.by_owner), [], None)
            except Exception as exc:
                log.warning("could not show that job %s was cancelled: %s", job.id, exc)

    async def _send_result(self, job: Job, reply: Reply, result: JobResult) -> str:
        """Upload the images in one message, re-encoded under the upload limit; smaller again
        on a 413. Images the NSFW check flagged go as spoilers, or not at all (blocked)."""
        if not result.shown:  # held back entirely: the user is told, the journal says so
            text = reply.with_note(render.blocked(len(result.images)))
            return delivered_blocked(await self._post(job.id, reply, text, [], None))
        caption = result_caption(result, job.user.display_name, reply.note)
        if len(result.shown) < len(result.images):
            caption = f"{caption}\n{render.partly_blocked(result)}"
        view = result_view(job.id, len(result.images), bool(result.request.upscale_tile))
        limit = reply.filesize_limit
        for attempt in range(3):
            uploads = fitted(job.id, result.shown, limit)
            try:
                return await self._post(job.id, reply, caption, uploads, view)
            except discord.HTTPException as exc:
                if exc.status != 413 or attempt == 2:
                    raise
                size = sum(len(data) for data, _ in uploads)
                log.warning("job %s: %d bytes were too large for Discord; shrinking", job.id,
                            size)
                limit = size // 2
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(self, job_id: str, reply: Reply, text: str, uploads: list[Upload],
                    view: discord.ui.View | None) -> str:
        """Edit the interaction's response while the token lives, else post to the channel."""
        if reply.interaction is not None and reply.token_alive(self.clock()):
            try:  # the same message every time: a retry after a lost answer cannot duplicate
                message = await asyncio.wait_for(reply.interaction.edit_original_response(
                    content=text, attachments=as_files(uploads), view=view),
                    self.post_timeout_s)
                return where(reply.channel_id, message)
            except discord.NotFound:  # token expired early, or the response was deleted
                log.info("interaction response gone; posting to channel %s", reply.channel_id)
        return await self._post_to_channel(job_id, reply, text, uploads, view)

    async def _post_to_channel(self, job_id: str, reply: Reply, text: str,
                               uploads: list[Upload], view: discord.ui.View | None) -> str:
        channel = self.client.get_partial_messageable(reply.channel_id)
        if reply.look_first:
            found = await self._find_posted(channel, job_id)
            if found is not None:
                log.info("job %s is in channel %s already (an answer was lost); not posting it "
                         "again", job_id, reply.channel_id)
                return where(reply.channel_id, found)
        user = discord.Object(id=reply.user_id)
        kwargs: dict[str, object] = {}
        if uploads:
            kwargs["files"] = as_files(uploads)
        if view is not None:
            kwargs["view"] = view
        reply.look_first = True  # from here on it may land without our hearing of it
        message = await asyncio.wait_for(channel.send(
            render.addressed(f"<@{reply.user_id}>", text),
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=[user]),
            nonce=nonce_of(job_id), **kwargs), self.post_timeout_s)  # type: ignore[arg-type]
        return where(reply.channel_id, message)

    async def _find_posted(self, channel: discord.PartialMessageable,
                           job_id: str) -> discord.Message | None:
        """The bot's message for this job among the channel's recent ones, if there is one."""
        me = self.client.user

        async def search() -> discord.Message | None:
            async for message in channel.history(limit=RECENT_MESSAGES):
                if me is not None and message.author.id == me.id and carries(message, job_id):
                    return message
            return None

        try:
            return await asyncio.wait_for(search(), self.post_timeout_s)
        except (discord.HTTPException, TimeoutError) as exc:  # e.g. no Read Message History
            log.info("could not look for job %s in channel %s (%s); the nonce still guards "
                     "a second post for a few minutes", job_id, channel.id, exc)
            return None


def where(channel_id: int, message: discord.Message) -> str:
    return f"discord:channel/{channel_id}/message/{message.id}"


def nonce_of(job_id: str) -> str:
    """The nonce of a job's channel post (Discord allows 25 characters)."""
    return f"imagine:{job_id}"[:25]


def fitted(job_id: str, images: tuple[ResultImage, ...], limit: int) -> list[Upload]:
    """The job's images as files named ``<job id>-<seed>.<ext>`` (``SPOILER_`` first where the
    NSFW check asks for a spoiler), each under an equal share of ``limit``: Discord counts the
    whole message against it."""
    return [(data, f"{SPOILER if image.spoiler else ''}{name}")
            for image, (data, name) in zip(images, fit_all(job_id, images, limit), strict=True)]


def as_files(uploads: list[Upload]) -> list[discord.File]:
    return [discord.File(io.BytesIO(data), filename=name.removeprefix(SPOILER),
                         spoiler=name.startswith(SPOILER)) for data, name in uploads]


_BUTTON_ID = re.compile(TEMPLATE)


def carries(message: discord.Message, job_id: str) -> bool:
    """A result message of this job (one image or a grid): its files are named after the job,
    its buttons other than Cancel carry it. (A failure notice carries neither; the nonce alone
    guards it; the Cancel button is on the progress message, not the result.)"""
    if any(a.filename.removeprefix(SPOILER).startswith(f"{job_id}-")
           for a in message.attachments):
        return True
    for row in message.components:
        for item in getattr(row, "children", []):
            match = _BUTTON_ID.fullmatch(getattr(item, "custom_id", None) or "")
            if match and match["job"] == job_id and match["action"] != "cancel":
                return True
    return False


def result_caption(result: JobResult, requester: str, note: str = "") -> str:
    """The text under an image: prompt (Markdown-escaped, mentions defused), facts, any note."""
    text = render.caption(result, requester, md=True)
    return f"{text}\n{note}" if note else text


def is_permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: no access, the channel is gone, a request Discord refuses."""
    if isinstance(exc, discord.HTTPException):
        return 400 <= exc.status < 500 and exc.status != 429
    return False
