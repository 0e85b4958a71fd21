"""Following one job in a Telegram chat: a status message, then the image as a reply (a grid
of ``--n`` images: an album, then a message with its buttons, since an album can carry none).

    follower = JobFollower(bot, engine, config)
    await follower.follow(job, announce=True)

The status message is edited by its own small task that always shows the *latest* text and
sleeps ``progress_interval_s`` after each edit, so a slow (rate-limited) edit never makes the
message lag behind, and a failed edit is logged and forgotten. The final upload goes through
``bot.delivery.deliver`` (retries, then the journal's undelivered path). Everything sent is plain
text (no ``parse_mode``), so Markdown or HTML in a prompt is shown as typed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import httpx
from telegram import (
    InlineKeyboardMarkup,
    InputMediaDocument,
    InputMediaPhoto,
    Message,
    ReplyParameters,
)
from telegram.constants import ChatAction, MessageLimit
from telegram.error import BadRequest, Forbidden, InvalidToken, TelegramError, TimedOut
from telegram.ext import ExtBot

from bot import render
from bot.delivery import RetryPolicy, deliver
from bot.media import fit_all, fit_under
from bot.telegram_buttons import cancel_keyboard, result_keyboard
from bot.telegram_limiter import ACK
from engine.config import Config
from engine.engine import Engine
from engine.job import (
    Cancelled,
    Failed,
    Finished,
    Job,
    JobResult,
    ResultImage,
)
from engine.moderation import Policy, delivered_blocked
from engine.pending import PendingReply
from engine.request import Origin

log = logging.getLogger(__name__)

PHOTO_MAX_BYTES = 10 * 1024 * 1024  # Bot API: larger photos are refused
PHOTO_MAX_SIDES = 10_000  # Bot API: width + height of a photo at most 10000
DOCUMENT_MAX_BYTES = 50 * 1024 * 1024  # cloud Bot API upload limit
LOCAL_DOCUMENT_MAX_BYTES = 2000 * 1024 * 1024  # a self-hosted Bot API server allows 2000 MB
# Telegram allows about 20 messages a minute in a group, edits included: edit at most every 6 s
# there, which leaves half of that budget for replies and other users' jobs.
GROUP_EDIT_INTERVAL_S = 6.0


def fits_as_photo(png: bytes, width: int, height: int) -> bool:
    """Whether Telegram takes this PNG as a photo (else it goes as a document)."""
    return len(png) <= PHOTO_MAX_BYTES and width + height <= PHOTO_MAX_SIDES


def is_permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: the bot was blocked or removed, the chat is gone, bad token."""
    return isinstance(exc, (Forbidden, BadRequest, InvalidToken))


def sent_but_unanswered(exc: BaseException) -> bool:
    """A read timeout: the whole request went out and Telegram may have posted it. A connect,
    write or pool timeout means it did not arrive whole, so a retry is safe."""
    return isinstance(exc, TimedOut) and isinstance(exc.__cause__, httpx.ReadTimeout)


@dataclass(frozen=True)
class Target:
    """Where a job's messages go: the chat, and the user's message they reply to."""

    chat_id: int
    reply_to: int | None
    thread_id: int | None
    is_group: bool

    @classmethod
    def of(cls, origin: Origin) -> Target:
        chat_id = int(origin.chat_id)
        reply_to = int(origin.message_id) if origin.message_id else None
        thread = origin.extra.get("thread_id")
        return cls(chat_id, reply_to, int(thread) if thread else None, chat_id < 0)

    def kwargs(self) -> dict[str, object]:
        """Reply to the user's message, but still post if it was deleted meanwhile."""
        args: dict[str, object] = {"chat_id": self.chat_id}
        if self.reply_to is not None:
            args["reply_parameters"] = ReplyParameters(self.reply_to,
                                                       allow_sending_without_reply=True)
        if self.thread_id is not None:
            args["message_thread_id"] = self.thread_id
        return args


@dataclass(frozen=True)
class MessageRef:
    """A message the bot posted: enough to edit or delete it (also after a restart)."""

    chat_id: int
    message_id: int


class StatusMessage:
    """The one message that shows a job's place in the queue and its progress."""

    def __init__(self, bot: ExtBot[Any], message: MessageRef, text: str, interval_s: float,
                 markup: InlineKeyboardMarkup | None, events_shown: int = 0) -> None:
        self.bot = bot
        self.events_shown = events_shown  # how many of the job's events ``text`` reflects
        self.message = message
        self.interval_s = interval_s
        self.markup = markup
        self._shown = text
        self._wanted = text
        self._kick = asyncio.Event()
        self._editor = asyncio.create_task(self._edit_loop(),
                                           name=f"tg-status-{message.message_id}")

    def show(self, text: str) -> None:
        """Ask for ``text`` to be shown; the editor shows the latest text when it may."""
        self._wanted = text
        self._kick.set()

    async def _edit_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            text = self._wanted
            if text == self._shown:
                continue
            try:
                await self._edit(text, self.markup)
            except TelegramError as exc:  # a progress edit must never fail the job
                log.info("progress edit in chat %s failed: %s", self.message.chat_id, exc)
            self._shown = text
            await asyncio.sleep(self.interval_s)

    async def _edit(self, text: str, markup: InlineKeyboardMarkup | None) -> None:
        await self.bot.edit_message_text(text, chat_id=self.message.chat_id,
                                         message_id=self.message.message_id, reply_markup=markup)

    async def stop_editing(self) -> None:
        self._editor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._editor

    async def finish(self, text: str) -> bool:
        """Show a final text without buttons at once; False if the edit failed."""
        await self.stop_editing()
        try:
            await self._edit(text, None)
        except TelegramError as exc:
            log.info("final edit in chat %s failed: %s", self.message.chat_id, exc)
            return False
        return True

    async def delete(self) -> None:
        await self.stop_editing()
        try:
            await self.bot.delete_message(self.message.chat_id, self.message.message_id)
        except TelegramError as exc:
            log.info("could not delete status message in chat %s: %s", self.message.chat_id, exc)


def _status_message_id(job: Job) -> int | None:
    """The status message a job recovered after a restart had before it, in its own chat."""
    chat, _, message = str(job.origin.extra.get("status_message", "")).partition(":")
    if not (job.recovered and message.isdigit() and chat == job.origin.chat_id):
        return None
    return int(message)


class JobFollower:
    """Shows one job's life in its chat and delivers its result (also after a restart)."""

    def __init__(self, bot: ExtBot[Any], engine: Engine, config: Config) -> None:
        self.bot = bot
        self.engine = engine
        self.config = config
        self.policy = RetryPolicy.from_config(config.delivery)
        self.document_limit = (LOCAL_DOCUMENT_MAX_BYTES if config.telegram.base_url
                               else DOCUMENT_MAX_BYTES)

    async def follow(self, job: Job, *, announce: bool) -> None:
        """``announce``: post a status message even if the job is already over (a new command)."""
        target = Target.of(job.origin)
        status: StatusMessage | None = None
        try:
            if announce or not job.status.is_terminal or _status_message_id(job) is not None:
                status = await self._post_status(job, target, ack=announce)
            index = 0
            async for event in job.events():
                index += 1
                if isinstance(event, Finished):
                    await self._deliver_image(job, event.result, target, status)
                elif isinstance(event, Failed):
                    await self._deliver_text(job, render.failed(event), target, status)
                elif isinstance(event, Cancelled):
                    if status is not None:
                        await status.finish(render.cancelled(event.by_owner))
                elif status is not None and index > status.events_shown:
                    status.show(render.job_status(event, job.request) or "")
        finally:
            if status is not None:
                await status.stop_editing()

    async def _chat_action(self, target: Target) -> None:
        try:
            await self.bot.send_chat_action(target.chat_id, ChatAction.UPLOAD_PHOTO,
                                            message_thread_id=target.thread_id)
        except TelegramError as exc:  # only a hint to the user: never worth failing for
            log.info("chat action in chat %s failed: %s", target.chat_id, exc)

    async def _post_status(self, job: Job, target: Target, *, ack: bool) -> StatusMessage | None:
        """``ack``: this message answers a new command, so it goes ahead of other jobs' traffic.

        No chat action first: the message follows at once, so the action would only spend the
        bot's 30 requests a second. A job recovered after a restart keeps the message it had:
        it is edited, not posted again (no stale "Queued" message with a live Cancel button).
        """
        events = job.events_so_far  # the message shows these; later events become edits
        text = ((render.job_status(events[-1], job.request) if events else None)
                or render.queued(job.position()))
        markup = cancel_keyboard(job.id)
        interval = self.config.telegram.progress_interval_s
        if target.is_group:
            interval = max(interval, GROUP_EDIT_INTERVAL_S)
        known = _status_message_id(job)
        if known is not None:
            status = StatusMessage(self.bot, MessageRef(target.chat_id, known), "", interval,
                                   markup, 0)
            if not job.status.is_terminal:
                status.show(text)  # brought up to date by an edit
            return status
        try:
            message = await self.bot.send_message(text=text, reply_markup=markup,
                                                  rate_limit_args=ACK if ack else None,
                                                  **target.kwargs())
        except TelegramError as exc:
            log.warning("could not post the status of job %s in chat %s: %s", job.id,
                        target.chat_id, exc)
            return None
        try:
            await self.engine.note_status_message(job, f"{message.chat_id}:{message.message_id}")
        except Exception as exc:  # the journal is closing: only a restart's nicety is lost
            log.info("could not note the status message of job %s: %s", job.id, exc)
        return StatusMessage(self.bot, MessageRef(message.chat_id, message.message_id), text,
                             interval, markup, len(events))

    async def _deliver_image(self, job: Job, result: JobResult, target: Target,
                             status: StatusMessage | None) -> None:
        if status is not None:
            await status.stop_editing()
        if not result.shown:  # the NSFW check held back every image: the user is told
            await self._deliver_text(job, render.blocked(len(result.images)), target, status,
                                     blocked=True)
            return
        await self._chat_action(target)

        async def send() -> str:
            if len(result.images) > 1:
                sent = await self._send_album(job, result, target)
            else:
                sent = await self._send_image(job, result, target)
            return f"telegram:{target.chat_id}/{sent.message_id}"

        async def tell_of_the_delay() -> None:
            if status is not None:
                await status.finish(render.undelivered(self.policy.give_up_after_s))

        if not await deliver(self.engine, job, send, policy=self.policy,
                             is_permanent=is_permanent, on_delay=tell_of_the_delay,
                             is_unknown=sent_but_unanswered):
            record = await self.engine.job_record(job.id)
            if status is not None:
                await status.finish(render.gave_up_delivery()
                                    if record is not None and record.delivery_given_up
                                    else render.undelivered())
            return
        if len(result.images) > 1:  # an album carries no buttons: they follow it
            await self._post_grid_buttons(job, result, target)
        if status is not None:
            await status.delete()
        await self._send_png_extras(job, result, target)

    async def _send_png_extras(self, job: Job, result: JobResult, target: Target) -> None:
        """``send_png_document``. Never for flagged images: a document cannot be a spoiler."""
        unflagged = all(image.policy is Policy.ALLOW for image in result.images)
        if self.config.telegram.send_png_document and unflagged:
            try:
                await self._send_png_documents(job, result, target)
            except TelegramError as exc:  # the photo arrived; the extra PNG is a bonus
                log.warning("sending the PNG of job %s failed: %s", job.id, exc)

    def _caption(self, job: Job, result: JobResult) -> str:
        text = render.caption(result, job.user.display_name)
        if len(result.shown) < len(result.images):
            text = f"{text}\n{render.partly_blocked(result)}"
        return render.shorten(text, MessageLimit.CAPTION_LENGTH)

    async def _send_image(self, job: Job, result: JobResult, target: Target) -> Message:
        caption = self._caption(job, result)
        markup = result_keyboard(job.id, upscaled=bool(result.request.upscale_tile))
        if result.images[0].spoiler:
            return await self.send_spoiler(result.png, f"{job.id}-{result.request.seed}", target,
                                           caption, markup)
        if fits_as_photo(result.png, result.request.width, result.request.height):
            return await self.bot.send_photo(photo=result.png, caption=caption, reply_markup=markup,
                                             filename=f"{job.id}-{result.request.seed}.png",
                                             **target.kwargs())
        return await self.send_document(result.png, f"{job.id}-{result.request.seed}", target,
                                        caption, markup)

    def _album_as_photos(self, result: JobResult) -> bool:
        """Photos, unless one would be refused; always photos when one needs a spoiler (only a
        photo can have one: it is shrunk under the photo limit instead)."""
        r = result.request
        return any(image.spoiler for image in result.images) or \
            all(fits_as_photo(image.png, r.width, r.height) for image in result.images)

    async def _send_album(self, job: Job, result: JobResult, target: Target) -> Message:
        """A grid as one media group, the caption on its first item; photos, or documents
        when a photo would be refused. Returns the first message. Only the images the NSFW
        check did not block; one left goes alone (an album needs two)."""
        caption = self._caption(job, result)
        shown = result.shown
        if len(shown) == 1:
            return await self._send_one_of_grid(job, shown[0], caption, target)
        items: list[InputMediaPhoto] | list[InputMediaDocument]
        if self._album_as_photos(result):
            items = [InputMediaPhoto(fit_under(image.png, PHOTO_MAX_BYTES)[0],
                                     caption=caption if index == 0 else None,
                                     filename=f"{job.id}-{image.seed}.png",
                                     has_spoiler=image.spoiler)
                     for index, image in enumerate(shown)]
        else:
            items = self._documents(job, result, caption)
        sent = await self.bot.send_media_group(media=items, **target.kwargs())
        return sent[0]

    def _documents(self, job: Job, result: JobResult,
                   caption: str | None = None) -> list[InputMediaDocument]:
        # the whole upload must fit the limit
        fitted = fit_all(job.id, result.shown, self.document_limit)
        return [InputMediaDocument(data, caption=caption if index == 0 else None, filename=name)
                for index, (data, name) in enumerate(fitted)]

    async def _post_grid_buttons(self, job: Job, result: JobResult, target: Target) -> None:
        """The grid's buttons, in a message of their own. Not part of the delivery: a retry
        there would post the album twice. Tried a few times; a read timeout is not retried
        (the message may be there already)."""
        text = render.grid_actions(len(result.images))
        markup = result_keyboard(job.id, len(result.images))
        assert markup is not None  # a grid always has buttons
        # Journalled until posted (or given up): a stop before that posts it at the next start.
        owed = PendingReply(f"telegram:buttons:{job.id}", "telegram", str(target.chat_id),
                            str(target.reply_to or ""), text, str(target.thread_id or ""),
                            self.engine.clock(), markup=json.dumps(markup.to_dict()))
        await self.engine.pending_replies.add(owed)
        for attempt in range(1, self.policy.attempts + 1):
            try:
                await self.bot.send_message(text=text, reply_markup=markup, **target.kwargs())
                break
            except TelegramError as exc:
                log.warning("posting the buttons of job %s failed (attempt %d): %s", job.id,
                            attempt, exc)
                if is_permanent(exc) or sent_but_unanswered(exc) \
                        or attempt == self.policy.attempts:
                    break
            await asyncio.sleep(self.policy.delay(attempt))
        await self.engine.pending_replies.remove(owed.reply_key)

    async def _send_png_documents(self, job: Job, result: JobResult, target: Target) -> None:
        """``send_png_document``: the lossless PNGs after the photos (a grid's as an album of
        documents; none when the grid already went as documents)."""
        if len(result.images) == 1:
            await self.send_document(result.png, f"{job.id}-{result.request.seed}", target)
        elif self._album_as_photos(result):
            await self.bot.send_media_group(media=self._documents(job, result),
                                            **target.kwargs())

    async def _send_one_of_grid(self, job: Job, image: ResultImage, caption: str,
                                target: Target) -> Message:
        """The one image of a grid the NSFW check left (its buttons follow, as a grid's)."""
        stem = f"{job.id}-{image.seed}"
        if image.spoiler:
            return await self.send_spoiler(image.png, stem, target, caption)
        r = job.request
        if fits_as_photo(image.png, r.width, r.height):
            return await self.bot.send_photo(photo=image.png, caption=caption,
                                             filename=f"{stem}.png", **target.kwargs())
        return await self.send_document(image.png, stem, target, caption)

    async def send_spoiler(self, png: bytes, stem: str, target: Target,
                           caption: str | None = None,
                           markup: InlineKeyboardMarkup | None = None) -> Message:
        """A photo behind Telegram's spoiler (``[moderation] policy = "spoiler"``), shrunk
        under the photo limit if need be: a document cannot be hidden."""
        data, ext = fit_under(png, PHOTO_MAX_BYTES)
        return await self.bot.send_photo(photo=data, caption=caption, reply_markup=markup,
                                         filename=f"{stem}.{ext}", has_spoiler=True,
                                         **target.kwargs())

    async def send_document(self, png: bytes, stem: str, target: Target,
                            caption: str | None = None,
                            markup: InlineKeyboardMarkup | None = None) -> Message:
        """A PNG as a document named ``<stem>.png`` (a JPEG if over the upload limit)."""
        data, ext = fit_under(png, self.document_limit)
        return await self.bot.send_document(document=data, caption=caption, reply_markup=markup,
                                            filename=f"{stem}.{ext}", **target.kwargs())

    async def _deliver_text(self, job: Job, text: str, target: Target,
                            status: StatusMessage | None, *, blocked: bool = False) -> None:
        """``blocked``: the notice of a result the NSFW check held back (journalled as such)."""
        async def send() -> str:
            if status is not None and await status.finish(text):
                where = f"telegram:{target.chat_id}/{status.message.message_id}"
            else:
                short = render.shorten(text, MessageLimit.MAX_TEXT_LENGTH)
                sent = await self.bot.send_message(text=short, **target.kwargs())
                where = f"telegram:{target.chat_id}/{sent.message_id}"
            return delivered_blocked(where) if blocked else where

        await deliver(self.engine, job, send, policy=self.policy, is_permanent=is_permanent)
