"""The Discord adapter: slash commands and buttons in, progress and images out.

    adapter = DiscordAdapter(engine, config)
    await adapter.start()    # log in, sync commands, connect; returns once the gateway is ready
    ...
    await adapter.stop()

``/imagine`` is written down in the journal first (``bot.discord_pending``: a crash before its
job is journalled is answered at the next start), parses (bad input gets an ephemeral error and
nothing is queued), defers at once (Discord drops interactions not acknowledged within 3 s),
then submits to the engine; ``bot.discord_reply`` carries the job from there. Every error of a
command or a button goes through ``report_error``, which logs and then tells the user privately.
Mentions are off for every message (``AllowedMentions.none()`` on the client); only a late
result mentions its user. The bot needs no privileged intents, only the ``guilds`` intent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import discord
from discord import app_commands

from bot import discord_image_alone as image_alone
from bot import language, render
from bot.delivery import RetryPolicy
from bot.discord_commands import build_commands
from bot.discord_i18n import GettextTranslator
from bot.discord_pending import answer_left_over, pending_of, request_key
from bot.discord_reply import POST_TIMEOUT_S, Follower, Reply
from bot.discord_views import JobButton
from bot.followers import Followers
from engine import input_image, variants
from engine.config import Config
from engine.engine import Engine
from engine.errors import EngineError
from engine.grammar import ParsedCommand, parse_command
from engine.job import Job
from engine.moderation import Policy
from engine.request import ImageRequest, Origin, User

log = logging.getLogger(__name__)


class NotHere(app_commands.CheckFailure):
    """A command in a guild or channel that ``access.discord_guilds/channels`` leaves out."""


class ImagineTree(app_commands.CommandTree):
    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        await self.client.adapter.use_language(interaction)  # type: ignore[attr-defined]
        if not self.client.adapter.allowed_here(interaction):  # type: ignore[attr-defined]
            raise NotHere(render.chat_not_allowed())
        return True

    async def on_error(self, interaction: discord.Interaction,
                       error: app_commands.AppCommandError, /) -> None:
        await self.client.adapter.report_error(interaction, error)  # type: ignore[attr-defined]


class ImagineClient(discord.Client):
    """A plain client (no message intents) that hands everything to its adapter."""

    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        intents = discord.Intents.none()
        intents.guilds = True  # guild and channel cache: upload limits, channel posts
        super().__init__(intents=intents, allowed_mentions=discord.AllowedMentions.none(),
                         **options)
        self.adapter = adapter
        self.tree = ImagineTree(self)

    async def setup_hook(self) -> None:
        for command in build_commands(self.adapter.config.limits):
            self.tree.add_command(command)
        self.add_dynamic_items(JobButton)  # buttons keep working after a restart
        await self.tree.set_translator(GettextTranslator())  # zh-CN/zh-TW descriptions
        await self.adapter.sync_commands()


class DiscordAdapter:
    name = "discord"

    def __init__(self, engine: Engine, config: Config, *, retry_policy: RetryPolicy | None = None,
                 clock: Callable[[], float] = time.time, ready_timeout_s: float = 60.0,
                 rng: random.Random | None = None, post_timeout_s: float = POST_TIMEOUT_S,
                 **client_options: Any) -> None:
        """``client_options`` go to ``discord.Client`` (tests: a small ``guild_ready_timeout``);
        ``post_timeout_s``: how long an upload's answer is awaited before it is taken as lost."""
        self.engine = engine
        self.config = config
        self.retry_policy = retry_policy or RetryPolicy.from_config(config.delivery)
        self.clock = clock
        self.ready_timeout_s = ready_timeout_s
        self.rng = rng or random.SystemRandom()
        self.post_timeout_s = post_timeout_s
        self.client_options = client_options
        self.client: ImagineClient | None = None
        self.follower: Follower | None = None
        self._gateway: asyncio.Task[None] | None = None
        self.followers = Followers()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        token = self.config.discord_token
        if not token:
            raise ValueError("no Discord token: set discord.token or DISCORD_TOKEN")
        self.client = ImagineClient(self, **self.client_options)
        self.follower = Follower(self.client, self.engine,
                                 interval_s=self.config.discord.progress_interval_s,
                                 policy=self.retry_policy, clock=self.clock,
                                 post_timeout_s=self.post_timeout_s)
        try:
            await self.client.login(token)  # also runs setup_hook: commands, buttons, sync
            self._gateway = asyncio.create_task(self.client.connect(), name="discord-gateway")
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        for job in self.engine.recovered_jobs("discord"):
            self.deliver_to_channel(job)
        told = await answer_left_over(self.client, self.engine.pending, self.clock(),
                                      language_of=self._channel_language)
        if told:
            log.info("told %d users whose command a restart lost to ask again", told)

    def deliver_to_channel(self, job: Job) -> None:
        """Follow a job with no live interaction (restored from the journal, or an undelivered
        result offered again): its result goes to its channel, mentioning its user."""
        assert self.follower is not None, "start() first"
        try:
            # Only a job that had ended can have been posted already; one that was queued or
            # running is not looked for (a history read each would crowd Discord's limits).
            reply = Reply.for_origin(job.origin, job.user.user_id,
                                     look_first=job.status.is_terminal)
        except (TypeError, ValueError):  # a journal row without a usable channel id
            log.error("job %s has no channel to deliver to: %r", job.id, job.origin)
            return
        log.info("delivering job %s to channel %s", job.id, reply.channel_id)
        self.followers.spawn(self._follow_in_its_language(job, reply), job,
                             f"discord-channel-{job.id}")

    async def _follow_in_its_language(self, job: Job, reply: Reply) -> None:
        """No interaction set this task's language: its channel's, or the one it was asked in."""
        assert self.follower is not None
        await language.choose_for_job(self.engine, self.config, job)
        await self.follower.follow(job, reply)

    async def _channel_language(self, channel_id: str) -> str:
        return await language.for_chat(self.engine, self.config, "discord", channel_id, None)

    async def _wait_ready(self) -> None:
        assert self.client is not None and self._gateway is not None
        ready = asyncio.create_task(self.client.wait_until_ready())
        done, _ = await asyncio.wait({ready, self._gateway}, timeout=self.ready_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
        if self._gateway in done:
            self._gateway.result()  # raises why the connection ended (e.g. intents refused)
            raise ConnectionError("the Discord gateway connection ended before it was ready")
        if ready not in done:
            log.warning("Discord is not ready after %.0f s; still connecting in the background",
                        self.ready_timeout_s)
        else:
            user = self.client.user
            log.info("Discord ready as %s (id %s)", user, user.id if user else "?")

    async def finish_answers(self, timeout: float) -> int:
        """At shutdown: let the answers being posted finish (see ``bot.followers``)."""
        return await self.followers.finish_answers(timeout)

    async def stop(self) -> None:
        await self.followers.cancel_all()
        if self.client is not None:
            await self.client.close()
        if self._gateway is not None:
            try:
                await asyncio.wait_for(self._gateway, timeout=5)
            except (TimeoutError, asyncio.CancelledError, Exception) as exc:
                log.debug("gateway task ended with %r", exc)
            self._gateway = None

    async def drain(self) -> None:
        """Wait until every job this adapter follows has been answered."""
        await self.followers.wait_all()

    async def sync_commands(self) -> None:
        """Globally (may take up to an hour to show), or to ``discord.sync_guild_ids`` (instant)."""
        assert self.client is not None
        tree = self.client.tree
        guild_ids = self.config.discord.sync_guild_ids
        targets = [discord.Object(id=int(g)) for g in guild_ids if g.strip().isdigit()]
        if len(targets) != len(guild_ids):
            log.error("discord.sync_guild_ids must be numeric guild ids; ignoring the others")
        try:
            if not targets:
                synced = await tree.sync()
                log.info("synced %d slash commands globally", len(synced))
            for guild in targets:
                tree.copy_global_to(guild=guild)
                synced = await tree.sync(guild=guild)
                log.info("synced %d slash commands to guild %s", len(synced), guild.id)
        except discord.HTTPException as exc:  # e.g. no applications.commands scope in a guild
            log.error("could not sync slash commands: %s", exc)


    # -- who and where -------------------------------------------------------------------------
    @staticmethod
    def user_of(interaction: discord.Interaction) -> User:
        # The account name, not the guild nickname (identity is the id; the name is for captions).
        return User("discord", str(interaction.user.id), interaction.user.name)

    async def use_language(self, interaction: discord.Interaction) -> None:
        """Replies to this interaction (and its job's) in the channel's or the user's language."""
        await language.choose(self.engine, self.config, "discord", interaction.channel_id or 0,
                              interaction.locale.value)

    def allowed_here(self, interaction: discord.Interaction) -> bool:
        """Guild and channel allow-lists (empty = everywhere); admins may use the bot anywhere."""
        access = self.config.access
        if self.engine.is_admin(self.user_of(interaction)):
            return True
        if access.discord_guilds and str(interaction.guild_id) not in access.discord_guilds:
            return False
        return not access.discord_channels or str(interaction.channel_id) in access.discord_channels

    # -- commands ----------------------------------------------------------------------------
    async def imagine(self, interaction: discord.Interaction, text: str,
                      options: dict[str, Any], image: discord.Attachment | None = None) -> None:
        """Parse (errors before any acknowledgement), defer at once, then queue. With an
        ``image``: its announced size is checked first, then it is downloaded and kept
        (``engine/input_image.py``) while the deferral shows."""
        limits = self.config.limits
        parsed, overridden = parse_command(text, limits).merged_with(limits, **options)
        if image is None:
            request: ImageRequest | None = parsed.to_request(limits, self.rng)
        else:
            input_image.check_announced(image.size, limits)
            request = None
        await interaction.response.defer(thinking=True)
        async with self._until_answered(interaction):
            if request is None:
                assert image is not None
                request = await self._start_from(image, parsed)
            with input_image.discarded_if_refused(request.init_image):
                await self._submit(interaction, request, render.conflicts_note(overridden))

    async def _start_from(self, image: discord.Attachment, parsed: ParsedCommand) -> ImageRequest:
        """The image-to-image request starting from the attached ``image``."""
        try:
            data = await image.read()
        except discord.HTTPException as exc:
            log.warning("could not download attachment %s: %s", image.id, exc)
            raise input_image.unavailable() from None
        folder = input_image.inputs_folder(self.config.engine.output_dir)
        return await asyncio.to_thread(input_image.request_for, parsed, data, self.config.limits,
                                       folder, self.rng)

    @contextlib.asynccontextmanager
    async def _until_answered(self, interaction: discord.Interaction) -> AsyncIterator[None]:
        """A deferred interaction stays in the journal until its job is there or its refusal
        was sent; an error is reported here. A cancellation (shutdown, crash) leaves it for
        the next start to answer. Written after the deferral, not before: only a deferred
        response can be edited after a restart, and the journal's synced write stays out of
        Discord's 3-second acknowledgement."""
        pending = pending_of(interaction)
        await self.engine.pending.add(pending)
        try:
            yield
        except Exception as exc:
            await self.report_error(interaction, exc)
        await self.engine.pending.remove(pending.request_key)

    async def _submit(self, interaction: discord.Interaction, request: ImageRequest,
                      note: str = "") -> None:
        assert self.follower is not None
        origin = origin_of(interaction)
        job = await self.engine.submit(self.user_of(interaction), request, origin,
                                       key=request_key(interaction))
        self.followers.spawn(self.follower.follow(job, Reply.for_interaction(interaction, note)),
                             job, f"discord-{job.id}")

    async def say(self, interaction: discord.Interaction, text: str) -> None:
        """An answer only the user sees."""
        await interaction.response.send_message(text, ephemeral=True)

    async def show_queue(self, interaction: discord.Interaction) -> None:
        jobs = self.engine.jobs_of(self.user_of(interaction))
        await self.say(interaction, render.queue_list(jobs))

    async def show_limits(self, interaction: discord.Interaction) -> None:
        quota = await self.engine.quota(self.user_of(interaction), origin_of(interaction))
        await self.say(interaction, render.quota(quota, self.engine.clock(), self.config.limits))

    async def cancel(self, interaction: discord.Interaction, job_id: str | None) -> None:
        # JobNotFound for someone else's job (unless an admin asks)
        found = await self.engine.cancel_named_or_latest((job_id or "").strip(),
                                                         self.user_of(interaction))
        await self.say(interaction, render.cancel_answer(*found))

    async def set_limit(self, interaction: discord.Interaction, member: discord.User,
                        images: int | None) -> None:
        target = User("discord", str(member.id), member.name)
        await self.engine.set_limit_override(target, images)
        log.info("%s set the image limit of %s to %s", self.user_of(interaction).key, target.key,
                 images)
        name = f"{render.safe_text(member.name, md=True, limit=64)} ({member.id})"
        await self.say(interaction, render.limit_set(name, images))

    # -- buttons -----------------------------------------------------------------------------
    async def button_allowed(self, interaction: discord.Interaction, action: str,
                             job_id: str) -> bool:
        """Only the job's owner may press its buttons (an admin may also cancel it)."""
        try:
            await self.use_language(interaction)  # the press's task: kept for on_button
            if not self.allowed_here(interaction):
                await self.say(interaction, render.chat_not_allowed())
                return False
            record = await self.engine.job_record(job_id)
            if record is None:
                await self.say(interaction, render.job_unknown())
                return False
            user = self.user_of(interaction)
            if self.engine.may_press(record, user, action):
                interaction.extras["record"] = record
                return True
            log.info("%s pressed %s on job %s of %s: refused", user.key, action, job_id,
                     record.user.key)
            await self.say(interaction, render.not_your_job())
            return False
        except Exception as exc:
            await self.report_error(interaction, exc)
            return False

    async def on_button(self, interaction: discord.Interaction, action: str, job_id: str,
                        index: int = 0, kind: str = "subtle") -> None:
        """``index`` (0-based) and ``kind`` ("subtle" or "strong"): the image of a U or V."""
        try:
            if action == "cancel":
                await self.cancel(interaction, job_id)
            elif action == "u":
                await self._post_alone(interaction, index)
            else:
                await self._new_job(interaction, action, index, kind)
        except Exception as exc:  # discord.py would only log it; the user must hear back
            await self.report_error(interaction, exc)

    async def _new_job(self, interaction: discord.Interaction, action: str, index: int,
                       kind: str) -> None:
        """Re-roll, More, V or Upscale: a new job from the pressed one (see ``imagine``)."""
        record = interaction.extras["record"]
        if action in ("v", "up") and variants.kept_image(record, index) is None:
            await self.say(interaction, render.image_gone())
            return
        request = variants.from_button(action, record, index, kind, self.config.limits, self.rng)
        await self._defer_and_submit(interaction, request)

    async def _defer_and_submit(self, interaction: discord.Interaction,
                                request: ImageRequest) -> None:
        await interaction.response.defer(thinking=True)
        async with self._until_answered(interaction):
            await self._submit(interaction, request)

    async def _post_alone(self, interaction: discord.Interaction, index: int) -> None:
        """U: image ``index`` of the pressed job alone, full size, as a new message. Journalled
        like a command, so a crash before the upload still answers the user after the restart."""
        record = interaction.extras["record"]
        path = variants.kept_image(record, index)
        if path is None:
            await self.say(interaction, render.image_gone())
            return
        await interaction.response.defer(thinking=True)
        async with self._until_answered(interaction):
            policy = await image_alone.policy(self.engine, interaction, record, path)
            if policy is Policy.BLOCK:
                await interaction.edit_original_response(content=render.blocked_alone(index + 1))
                return
            text, upload, view = await asyncio.to_thread(
                image_alone.message, record, index, path, interaction.filesize_limit,
                policy is Policy.SPOILER)
            await interaction.edit_original_response(content=text, attachments=[upload],
                                                     view=view)

    # -- errors ------------------------------------------------------------------------------
    async def report_error(self, interaction: discord.Interaction, error: BaseException) -> None:
        """The one error handler: log, then tell the user privately."""
        if isinstance(error, app_commands.CommandInvokeError):
            error = error.original
        who = f"discord:{interaction.user.id}" if interaction.user else "discord:?"
        if isinstance(error, EngineError):
            log.info("refused %s: %s", who, error)
            text = render.error(error)
        elif isinstance(error, app_commands.CheckFailure) and str(error):
            log.info("refused %s: %s", who, error)
            text = str(error)
        else:
            log.error("command from %s failed", who, exc_info=error)
            text = render.internal_error()
        await self._tell_privately(interaction, text)

    async def _tell_privately(self, interaction: discord.Interaction, text: str) -> None:
        try:
            if not interaction.response.is_done():
                await interaction.response.send_message(text, ephemeral=True)
                return
            deferred = discord.InteractionResponseType.deferred_channel_message
            if interaction.response.type is deferred:
                # Our deferrals are public "thinking…" messages: the first follow-up would replace
                # it publicly, so remove it and send the error only the user can see.
                await interaction.delete_original_response()
            await interaction.followup.send(text, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("could not tell %s about an error: %s", interaction.user.id, exc)


def origin_of(interaction: discord.Interaction) -> Origin:
    """Where an interaction came from: its channel, its server (the shared cap's key) and the
    upload limit there."""
    return Origin("discord", chat_id=str(interaction.channel_id), message_id=str(interaction.id),
                  extra=language.remembered({"guild_id": str(interaction.guild_id or ""),
                                             "filesize_limit": interaction.filesize_limit}))
