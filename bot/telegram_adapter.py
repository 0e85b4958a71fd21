"""The Telegram adapter (python-telegram-bot): commands and buttons in, engine jobs out.

    adapter = TelegramAdapter(engine, config)
    await adapter.start()    # getMe, setMyCommands, recovered jobs, long polling in the background
    ...
    await adapter.stop()

Users: ``/imagine <prompt> --flags`` (also ``/imagine@BotName``; plain text in a private chat when
``telegram.plain_text_prompts``; as a photo's caption, or a reply to one, it starts from that
picture: ``bot/telegram_input.py``), ``/queue``, ``/cancel [id]``, ``/limits``, ``/help``; admins
also ``/status``, ``/stats``, ``/pause``, ``/resume``, ``/limit <user id> <n|default>`` and
``/cancel <anyone's id>``.
Chats outside ``access.telegram_chats`` (when set) are refused politely; admins may use the bot
anywhere. Buttons carry the action and the job id (``bot/telegram_buttons.py``: cancel, re-roll,
more steps, U<n>, V<n>); only the requester's presses act, and every press is answered.
``telegram.base_url`` points the bot at a self-hosted Bot API server.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from telegram import (
    BotCommand,
    BotCommandScopeChat,
    CallbackQuery,
    InlineKeyboardMarkup,
    Message,
    ReplyParameters,
    Update,
)
from telegram.constants import MessageLimit
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bot import i18n, language, render, telegram_input
from bot.admin_args import parse_limit_value
from bot.followers import Followers
from bot.i18n import N_
from bot.secrets_filter import SecretFilter
from bot.telegram_buttons import (
    ALONE,
    CANCEL,
    Press,
    alone_keyboard,
    new_request,
    parse_press,
    queued_answer,
)
from bot.telegram_jobs import JobFollower, Target
from bot.telegram_limiter import ACK, PriorityRateLimiter
from bot.telegram_outbox import ChatOutbox
from bot.telegram_polling import JournalledPolling, current_update
from engine import input_image, variants
from engine.config import Config
from engine.engine import AlreadyAccepted, Engine
from engine.errors import EngineError, JobNotFound
from engine.grammar import parse_command
from engine.job import Job, JobResult
from engine.moderation import Policy
from engine.pending import PendingReply
from engine.request import Origin, User
from engine.store import JobRecord

log = logging.getLogger(__name__)

COMMANDS = [
    BotCommand("imagine", N_("Draw an image: /imagine a red fox --seed 7")),
    BotCommand("queue", N_("Your images waiting and their place in line")),
    BotCommand("cancel", N_("Cancel your latest image, or /cancel <id>")),
    BotCommand("limits", N_("How many images you have left")),
    BotCommand("help", N_("How to use the options")),
    BotCommand("styles", N_("The styles you can add with --style")),
]
# The menu of an admin's private chat with the bot adds the admin commands.
ADMIN_COMMANDS = [
    *COMMANDS,
    BotCommand("status", N_("Admins: queue, running job, memory, last error")),
    BotCommand("stats", N_("Admins: images, GPU time, waits and top users")),
    BotCommand("pause", N_("Admins: start no new images")),
    BotCommand("resume", N_("Admins: start images again")),
    BotCommand("language", N_("Admins: this chat's reply language (zh, en or auto)")),
]
# Each menu again for Telegram apps set to Chinese ("zh" covers zh-hans, zh-cn, ...).
MENU_LANGUAGES = ("zh",)
CALLBACK_ANSWER_CHARS = 200  # Telegram's limit for a callback query answer
RATE_LIMIT_RETRIES = 3  # the rate limiter waits out a 429's retry_after this many times
# Telegram unreachable at start: the first retry after this many seconds, doubling up to the max.
RECONNECT_FIRST_S = 5.0
RECONNECT_MAX_S = 300.0
# An answer the last run decided but could not post is posted after a restart up to this old.
LEFT_OVER_REPLY_S = 600.0
# Loggers that see this adapter's requests and errors. httpx logs every request URL, and the URL
# holds the token; an exception text might too. The filter masks the token at the source, also
# where no root-handler filter (bot.secrets_filter.install_secret_filter) is installed.
MASKED_LOGGERS = ("httpx", __name__, "bot.telegram_jobs", "bot.delivery", "telegram.ext.Updater",
                  "telegram.ext.Application", "bot.telegram_limiter", "telegram.ext.ExtBot")
Handler = Callable[[Message, User, list[str]], Awaitable[None]]


class TelegramAdapter:
    name = "telegram"

    def __init__(self, engine: Engine, config: Config, *, poll_timeout_s: float = 10.0,
                 rate_limiter: PriorityRateLimiter | None = None) -> None:
        self.engine = engine
        self.config = config
        self.poll_timeout_s = poll_timeout_s
        self.rate_limiter = rate_limiter  # None: Telegram's own limits (tests pass slower ones)
        self.application: Application | None = None  # type: ignore[type-arg]
        self.follower: JobFollower | None = None
        self.followers = Followers()
        self.outbox = ChatOutbox()
        self._reconnecting: asyncio.Task[None] | None = None
        self.polling: JournalledPolling | None = None
        self._log_filter = SecretFilter([config.telegram_token])

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (getMe), publish the command menu, deliver recovered jobs, start polling.
        A wrong token fails here. When Telegram cannot be reached, the bot starts anyway and
        keeps trying in the background with a growing delay (the other adapters serve
        meanwhile)."""
        for name in MASKED_LOGGERS:
            logging.getLogger(name).addFilter(self._log_filter)
        try:
            await self._connect()
        except NetworkError as exc:  # not InvalidToken: a wrong token stops the start
            self._log_unreachable(exc, RECONNECT_FIRST_S)
            self._reconnecting = asyncio.create_task(self._connect_later(),
                                                     name="telegram-reconnect")
        except BaseException:
            for name in MASKED_LOGGERS:
                logging.getLogger(name).removeFilter(self._log_filter)
            raise

    async def _connect(self) -> None:
        app = self._build()
        self.application = app
        try:
            await app.initialize()  # getMe: a wrong token fails here
            self.follower = JobFollower(app.bot, self.engine, self.config)
            await self._publish_commands(app)
            await app.start()
            self.polling = JournalledPolling(app, self.poll_timeout_s)
            self.polling.start()
        except BaseException:
            await self._close_application()
            raise
        await self._post_left_over_replies(app.bot)
        for job in self.engine.recovered_jobs("telegram"):
            self._follow(job, announce=False, recovered=True)
        log.info("telegram: connected as @%s", app.bot.username)

    async def _publish_commands(self, app: Application) -> None:  # type: ignore[type-arg]
        """Everyone's menu, then each admin's (their private chat with the bot). The menu is a
        convenience, and an admin who never wrote to the bot has no chat yet: failures are
        logged, the commands work without it."""
        menus = [(COMMANDS, None)] + [
            (ADMIN_COMMANDS, BotCommandScopeChat(int(admin)))
            for admin in self.config.access.telegram_admins if _is_number(admin, 20)]
        for commands, scope in menus:
            for code in (None, *MENU_LANGUAGES):
                try:
                    await app.bot.set_my_commands(_in_language(commands, code), scope=scope,
                                                  language_code=code)
                except TelegramError as exc:
                    log.warning("telegram: setMyCommands (%s, %s) failed: %s",
                                scope or "default", code or "any language", exc)

    async def _connect_later(self) -> None:
        delay = RECONNECT_FIRST_S
        while True:
            await asyncio.sleep(delay)
            try:
                await self._connect()
                return
            except InvalidToken:
                log.error("telegram: the Bot API refused the token; the Telegram adapter is off")
                return
            except Exception as exc:  # network, a proxy's odd answer, a 429: keep trying
                delay = min(delay * 2, RECONNECT_MAX_S)
                self._log_unreachable(exc, delay)

    def _log_unreachable(self, exc: Exception, delay: float) -> None:
        log.warning("telegram: cannot reach Telegram's Bot API (%s); retrying in %.0f s",
                    exc, delay)

    async def stop(self) -> None:
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            await asyncio.gather(self._reconnecting, return_exceptions=True)
            self._reconnecting = None
        try:
            await self._close_application(final=True)
        finally:
            for name in MASKED_LOGGERS:
                logging.getLogger(name).removeFilter(self._log_filter)

    async def _close_application(self, final: bool = False) -> None:
        """Stop polling and close the HTTP client; ``final`` (the adapter stops): also end the
        followers and the outbox."""
        app = self.application
        try:
            if self.polling is not None:
                await self.polling.stop(confirm=final)
                self.polling = None
            if app is not None and app.running:
                await app.stop()
            if final:
                # answers still being posted had their time in finish_answers; an unfinished
                # delivery stays undelivered in the journal
                await self.followers.cancel_all()
                await self.outbox.close()
            if app is not None:
                await app.shutdown()
        finally:
            self.application = None

    async def finish_answers(self, timeout: float) -> int:
        """At shutdown: let the answers being posted finish (see ``bot.followers``)."""
        return await self.followers.finish_answers(timeout)

    def _build(self) -> Application:  # type: ignore[type-arg]
        tg = self.config.telegram
        builder = (Application.builder().token(self.config.telegram_token)
                   .updater(None)  # our own polling: bot/telegram_polling.py
                   # Telegram's limits, but replies to commands go ahead of edits and uploads
                   .rate_limiter(self.rate_limiter
                                 or PriorityRateLimiter(max_retries=RATE_LIMIT_RETRIES))
                   .concurrent_updates(True)  # one slow chat must not hold up the others
                   .read_timeout(tg.read_timeout_s)
                   .media_write_timeout(max(tg.read_timeout_s, 20.0)))
        if tg.base_url:
            builder = builder.base_url(tg.base_url)
        if tg.base_file_url:
            builder = builder.base_file_url(tg.base_file_url)
        app = builder.build()
        new_messages = filters.UpdateType.MESSAGE  # not edits: editing must not re-queue
        user_commands: dict[str, Handler] = {
            "imagine": self._imagine, "help": self._help, "start": self._help,
            "queue": self._queue, "cancel": self._cancel, "limits": self._limits,
            "styles": self._styles,
        }
        admin_commands: dict[str, Handler] = {
            "status": self._status, "pause": self._pause, "resume": self._resume,
            "limit": self._limit, "stats": self._stats, "language": self._language,
        }
        for name, handler in user_commands.items():
            app.add_handler(CommandHandler(name, self._guarded(handler), filters=new_messages))
        for name, handler in admin_commands.items():
            app.add_handler(CommandHandler(name, self._guarded(handler, admin=True),
                                           filters=new_messages))
        app.add_handler(MessageHandler(telegram_input.PICTURE_WITH_COMMAND & new_messages,
                                       self._guarded(self._imagine)))
        if tg.plain_text_prompts:
            app.add_handler(MessageHandler(
                filters.TEXT & ~filters.COMMAND & filters.ChatType.PRIVATE & new_messages,
                self._guarded(self._imagine)))
        app.add_handler(CallbackQueryHandler(self._button))
        app.add_error_handler(self._on_error)
        return app

    # -- access ----------------------------------------------------------------------------
    def _chat_allowed(self, chat_id: int, user: User) -> bool:
        allowed = self.config.access.telegram_chats
        return not allowed or str(chat_id) in allowed or self.engine.is_admin(user)

    def _guarded(self, handler: Handler, *, admin: bool = False
                 ) -> Callable[[Update, ContextTypes.DEFAULT_TYPE], Awaitable[None]]:
        """Wrap a command: known user, allowed chat, admin if asked; EngineErrors to the user."""
        async def run(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            message, tg_user = update.effective_message, update.effective_user
            if message is None or tg_user is None:
                return
            user = telegram_user(tg_user.id, tg_user.full_name)
            await language.choose(self.engine, self.config, "telegram", message.chat_id,
                                  tg_user.language_code)  # for this update and its job
            if not self._chat_allowed(message.chat_id, user):
                log.info("telegram: %s refused in chat %s (not allowed)", user.key, message.chat_id)
                if self.outbox.refusal_due(message.chat_id, "not allowed"):
                    await self._reply(message, render.chat_not_allowed())
            elif admin and not self.engine.is_admin(user):
                log.info("telegram: %s refused an admin command", user.key)
                await self._reply(message, render.admin_only())
            else:
                await handler(message, user, list(context.args or []))

        return run

    # -- commands --------------------------------------------------------------------------
    async def _imagine(self, message: Message, user: User, args: list[str]) -> None:
        """/imagine <prompt> --flags (or a plain private message, or a picture's caption):
        queue an image."""
        limits = self.config.limits
        parsed = parse_command(message.text or message.caption or "", limits)
        picture = telegram_input.picture_of(message)
        if picture is None:
            request = parsed.to_request(limits)
        else:  # image-to-image from the picture sent with the command, or replied to
            request = await telegram_input.request_from(message.get_bot(), picture, parsed,
                                                        self.config)
        extra = {"thread_id": message.message_thread_id} if message.is_topic_message else {}
        origin = Origin("telegram", chat_id=str(message.chat_id),
                        message_id=str(message.message_id), extra=language.remembered(extra))
        try:
            with input_image.discarded_if_refused(request.init_image):
                job = await self.engine.submit(user, request, origin, key=current_update.get())
        except AlreadyAccepted:  # sent again after a crash: its job was recovered already
            return
        self._follow(job, announce=True)

    async def _help(self, message: Message, user: User, args: list[str]) -> None:
        """/help: the options and their limits."""
        await self._reply(message, render.usage(self.config.limits), droppable=True)

    async def _styles(self, message: Message, user: User, args: list[str]) -> None:
        """/styles: the configured LoRA styles."""
        await self._reply(message, render.styles_list(self.config.styles), droppable=True)

    async def _queue(self, message: Message, user: User, args: list[str]) -> None:
        """/queue: the user's images and their places in line."""
        await self._reply(message, render.queue_list(self.engine.jobs_of(user)), droppable=True)

    async def _limits(self, message: Message, user: User, args: list[str]) -> None:
        """/limits: images left in this window."""
        quota = await self.engine.quota(user, Origin("telegram", chat_id=str(message.chat_id)))
        await self._reply(message, render.quota(quota, self.engine.clock(), self.config.limits),
                          droppable=True)

    async def _cancel(self, message: Message, user: User, args: list[str]) -> None:
        """/cancel [id]: the user's latest job, or one by id (admins: anyone's)."""
        job_id = args[0][:32] if args else ""
        answer = render.cancel_answer(*await self.engine.cancel_named_or_latest(job_id, user))
        await self._reply(message, answer)

    async def _status(self, message: Message, user: User, args: list[str]) -> None:
        """/status (admins): queue, running job, memory, last error (details in private)."""
        private = message.chat.type == "private"
        await self._reply(message, render.status(self.engine.health(), private=private))

    async def _stats(self, message: Message, user: User, args: list[str]) -> None:
        """/stats (admins): the last day's and week's use (names only, no ids, in a group)."""
        private = message.chat.type == "private"
        await self._reply(message, render.stats(await self.engine.stats(), private=private),
                          droppable=True)

    async def _pause(self, message: Message, user: User, args: list[str]) -> None:
        """/pause (admins): accept jobs but start none."""
        self.engine.pause()
        log.info("telegram: queue paused by %s", user.key)
        await self._reply(message, render.queue_paused())

    async def _resume(self, message: Message, user: User, args: list[str]) -> None:
        """/resume (admins): start jobs again."""
        self.engine.resume()
        log.info("telegram: queue resumed by %s", user.key)
        await self._reply(message, render.queue_resumed())

    async def _limit(self, message: Message, user: User, args: list[str]) -> None:
        """/limit <user id> <n|default> (admins): a per-user image limit override."""
        parsed = parse_limit(args)
        if parsed is None:
            await self._reply(message, render.limit_usage())
            return
        target, images = parsed
        await self.engine.set_limit_override(target, images)
        log.info("telegram: %s set the limit of %s to %s", user.key, target.key, images)
        await self._reply(message, render.limit_set(target.user_id, images))

    async def _language(self, message: Message, user: User, args: list[str]) -> None:
        """/language zh|en|auto (admins): this chat's reply language."""
        text = await language.set_for_chat(self.engine, "telegram", message.chat_id,
                                           args[0] if args else "")
        await self._reply(message, text)

    # -- buttons ---------------------------------------------------------------------------
    async def _button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Button presses: the requester's act, every press is answered."""
        query = update.callback_query
        if query is None:
            return
        user = telegram_user(query.from_user.id, query.from_user.full_name)
        chat_id = query.message.chat.id if query.message else query.from_user.id
        await language.choose(self.engine, self.config, "telegram", chat_id,
                              query.from_user.language_code)
        try:
            text, alert = await self._press(query, user)
        except EngineError as exc:
            text, alert = render.error(exc), True
        except Exception:
            log.exception("telegram: button %r failed", query.data)
            text, alert = render.internal_error(), True
        try:
            await query.answer(render.shorten(text, CALLBACK_ANSWER_CHARS) if text else None,
                               show_alert=alert)
        except TelegramError as exc:  # the query may have expired (15 s); nothing to do
            log.info("telegram: answering a button press failed: %s", exc)

    async def _press(self, query: CallbackQuery, user: User) -> tuple[str, bool]:
        """Act on a press; returns the answer text and whether it is an alert."""
        press = parse_press(query.data or "")
        message = query.message
        if press is None or message is None:
            return "", False  # an old or foreign button: answer quietly
        if not self._chat_allowed(message.chat.id, user):
            return render.chat_not_allowed(), True
        # the journal, not memory: the buttons of a job from before a restart work too
        record = await self.engine.job_record(press.job_id)
        if record is None:
            return render.job_unknown(), True
        if not self.engine.may_press(record, user, press.action):
            return render.not_your_job(), True
        if press.action == CANCEL:
            try:
                done = await self.engine.cancel(press.job_id, user)
            except JobNotFound:  # no longer live (finished before a restart)
                done = False
            return (render.cancelling(press.job_id) if done else render.already_over()), False
        # a reply to the pressed message, in the parent's thread, never with its status message
        origin = Origin("telegram", chat_id=str(message.chat.id),
                        message_id=str(message.message_id),
                        extra=language.remembered({k: v for k, v in record.origin.extra.items()
                                                   if k != "status_message"}))
        if press.action == ALONE:
            return await self._post_alone(record, press, origin)
        return await self._submit_press(press, record, user, origin)

    async def _submit_press(self, press: Press, record: JobRecord, user: User,
                            origin: Origin) -> tuple[str, bool]:
        """Re-roll, More or V: a new job from the pressed one, followed like a command's."""
        request = new_request(press, record, self.config.limits)
        try:
            job = await self.engine.submit(user, request, origin, key=current_update.get())
        except AlreadyAccepted:  # the press was sent again after a crash
            return "", False
        self._follow(job, announce=True)
        return queued_answer(press, request), False

    async def _post_alone(self, record: JobRecord, press: Press,
                          origin: Origin) -> tuple[str, bool]:
        """U<n>: image n as a full-size PNG document with its own parameters. Posted by the
        chat's outbox, so the press is answered at once (its answer expires in 15 s)."""
        path = variants.kept_image(record, press.number - 1)
        if path is None:
            return render.image_gone(), True
        png = await asyncio.to_thread(path.read_bytes)
        policy = await self.engine.policy_of(record.job_id, origin, png)  # NSFW check, here
        if policy is Policy.BLOCK:
            return render.blocked_alone(press.number), True
        one = variants.alone(record.request, press.number - 1)
        caption = render.shorten(
            render.caption(JobResult.single(png, one, "", 0.0), record.user.display_name),
            MessageLimit.CAPTION_LENGTH)
        follower, target = self.follower, Target.of(origin)
        assert follower is not None  # buttons are handled only while connected

        def send() -> Awaitable[object]:
            post = follower.send_spoiler if policy is Policy.SPOILER else follower.send_document
            return post(png, f"{record.job_id}-{one.seed}", target, caption,
                        alone_keyboard(record.job_id, press.number))

        self.outbox.post(target.chat_id, send)
        return render.posting_alone(press.number), False

    # -- helpers ---------------------------------------------------------------------------
    def _follow(self, job: Job, *, announce: bool, recovered: bool = False) -> None:
        """``recovered``: a job from before a restart, whose language no live update set."""
        assert self.follower is not None
        self.followers.spawn(self._follow_safely(job, announce, recovered), job,
                             f"telegram-{job.id}")

    async def _follow_safely(self, job: Job, announce: bool, recovered: bool = False) -> None:
        try:
            if recovered:  # this task's own language: its chat's, or the one it was asked in
                await language.choose_for_job(self.engine, self.config, job)
            await self.follower.follow(job, announce=announce)  # type: ignore[union-attr]
        except Exception:  # one job's chat trouble must never stop the bot
            log.exception("telegram: following job %s failed", job.id)

    async def _reply(self, message: Message, text: str, *, droppable: bool = False) -> None:
        """Answer a command through the chat's outbox (``bot/telegram_outbox.py``): the handler
        never waits for the chat's flood limit. Marked ACK so it goes ahead of other jobs'
        edits and uploads."""
        # Message.reply_text cannot carry rate_limit_args; this is what it sends.
        thread_id = message.message_thread_id if message.is_topic_message else None
        bot = message.get_bot()

        if droppable:  # /help, /queue, /limits: asked again if lost
            self._post_reply(bot, message.chat_id, message.message_id, thread_id, text,
                             droppable=True)
            return
        # A refusal or an error: journalled before the handler returns (and so before the
        # update is confirmed), so a crash before it is posted still answers the command.
        pending = PendingReply(f"telegram:{message.chat_id}:{message.message_id}", "telegram",
                               str(message.chat_id), str(message.message_id), text,
                               str(thread_id or ""), self.engine.clock())
        await self.engine.pending_replies.add(pending)
        self._post_reply(bot, message.chat_id, message.message_id, thread_id, text,
                         done=lambda: self.engine.pending_replies.remove(pending.reply_key))

    def _post_reply(self, bot: Any, chat_id: int, reply_to: int | None, thread_id: int | None,
                    text: str, *, droppable: bool = False,
                    done: Callable[[], Awaitable[None]] | None = None,
                    markup: InlineKeyboardMarkup | None = None) -> None:
        reply = None if reply_to is None else ReplyParameters(reply_to,
                                                              allow_sending_without_reply=True)

        def send() -> Awaitable[object]:
            return bot.send_message(
                chat_id, render.shorten(text, MessageLimit.MAX_TEXT_LENGTH),
                reply_parameters=reply, reply_markup=markup, message_thread_id=thread_id,
                rate_limit_args=ACK)

        self.outbox.post(chat_id, send, droppable=droppable, done=done)

    async def _post_left_over_replies(self, bot: Any) -> None:
        """Answers the last run decided but did not post (it stopped first): posted now,
        if they are at most ``LEFT_OVER_REPLY_S`` old."""
        replies = await self.engine.pending_replies.take(
            "telegram", since=self.engine.clock() - LEFT_OVER_REPLY_S)
        for reply in replies:
            key = reply.reply_key
            markup = (InlineKeyboardMarkup.de_json(json.loads(reply.markup), bot)
                      if reply.markup else None)  # a grid's buttons
            self._post_reply(bot, int(reply.chat_id),
                             int(reply.reply_to) if reply.reply_to else None,
                             int(reply.thread_id) if reply.thread_id else None, reply.text,
                             done=lambda key=key: self.engine.pending_replies.remove(key),
                             markup=markup)
        if replies:
            log.info("telegram: posting %d answers the last run left unposted", len(replies))

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log the error first, then tell the user (PTB's errorhandlerbot.py order)."""
        error = context.error
        if isinstance(update, Update) and update.effective_chat and update.effective_user:
            await language.choose(self.engine, self.config, "telegram", update.effective_chat.id,
                                  update.effective_user.language_code)
        if isinstance(error, EngineError):  # the user's mistake or a limit: not a bot fault
            log.info("telegram: refused: %s", error)
            text = render.error(error)
        else:
            log.error("telegram: error while handling an update", exc_info=error)
            text = render.internal_error()
        message = update.effective_message if isinstance(update, Update) else None
        if message is not None:
            await self._reply(message, text)  # the chat's outbox logs a reply it cannot post


def _in_language(commands: list[BotCommand], language: str | None) -> list[BotCommand]:
    if language is None:
        return commands
    words = i18n.translation(language)
    return [BotCommand(c.command, words.gettext(c.description)) for c in commands]


def telegram_user(user_id: int, name: str) -> User:
    return User("telegram", str(user_id), name[:64])


def parse_limit(args: list[str]) -> tuple[User, int | None] | None:
    """``<user id> <n|0|unlimited|default>`` -> (user, images as ``parse_limit_value`` gives
    them); None when malformed."""
    if len(args) != 2 or not _is_number(args[0], 20):
        return None
    ok, images = parse_limit_value(args[1])
    return (telegram_user(int(args[0]), ""), images) if ok else None


def _is_number(text: str, max_digits: int) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= max_digits
