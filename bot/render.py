"""Every sentence the bot says, in one place, with no chat library: both platforms say the same.

Prompts are user text: in Discord messages they are Markdown-escaped (``md=True``); Telegram
messages are sent as plain text, so nothing there is interpreted. Mentions are never pinged (the
adapters turn allowed mentions off), but ``@everyone`` is also broken with a zero-width joiner as
a second guard.
"""

from __future__ import annotations

import math
import re
import time

from bot.i18n import N_, _, ngettext
from engine.backends import ModelState
from engine.cluster.messages import WorkerInfo
from engine.config import LimitsSection, StyleSection
from engine.engine import Health
from engine.errors import EngineError
from engine.grammar import clean_prompt, usage_lines
from engine.job import Failed, Job, JobEvent, JobResult, Progress, Queued, Started
from engine.quota_text import amount
from engine.rate_limit import Quota
from engine.request import ImageRequest, Source
from engine.stats import UsageStats

CAPTION_PROMPT_CHARS = 300
_MD_SPECIAL = re.compile(r"([\\*_~`|>#\[\]()-])")
_MASS_MENTION = re.compile(r"@(everyone|here)", re.IGNORECASE)


def escape_markdown(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


def shorten(text: str, limit: int) -> str:
    """At most ``limit`` characters; a cut is marked with "…"."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def safe_text(text: str, *, md: bool = False, limit: int | None = None) -> str:
    """User text made safe to echo: cleaned of control/bidi/zero-width characters, shortened,
    mass mentions defused, Markdown escaped if asked."""
    text = clean_prompt(text)
    if limit is not None:
        text = shorten(text, limit)
    text = _MASS_MENTION.sub("@\u200d\\1", text)
    return escape_markdown(text) if md else text


def duration(seconds: float) -> str:
    """Human time: '9 s', '3 min', '1 h 5 min'."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return _("{n} s").format(n=max(1, math.ceil(seconds)))
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return _("{n} min").format(n=minutes)
    hours, rest = divmod(minutes, 60)
    if rest:
        return _("{hours} h {minutes} min").format(hours=hours, minutes=rest)
    return _("{n} h").format(n=hours)


def queued(position: int | None) -> str:
    if not position or position <= 1:
        return _("⏳ Queued: you are next.")
    return _("⏳ Queued: number {position} in line.").format(position=position)


def steps(n: int) -> str:
    return ngettext("{n} step", "{n} steps", n).format(n=n)


def started(request: ImageRequest) -> str:
    return _("🎨 Drawing… ({steps})").format(steps=steps(request.steps))


def progress(step: int, total: int, eta_s: float | None) -> str:
    bar_len = 10
    filled = round(bar_len * step / total) if total else 0
    bar = "▰" * filled + "▱" * (bar_len - filled)
    if eta_s is None or step >= total:
        eta = ""
    elif eta_s < 1.5:
        eta = _(", nearly done")  # "about 1 s left" on a 0.3 s job read as a promise
    else:
        eta = _(", about {time} left").format(time=duration(eta_s))
    return _("🎨 {bar} step {step}/{total}{eta}").format(bar=bar, step=step, total=total, eta=eta)


def job_status(event: JobEvent, request: ImageRequest) -> str | None:
    """The status line for a waiting or running job's event; None for the final events
    (finished, failed, cancelled), which each adapter answers in its own way."""
    if isinstance(event, Queued):
        return queued(event.position)
    if isinstance(event, Started):
        return started(request)
    if isinstance(event, Progress):
        return progress(event.step, event.total, event.eta_s)
    return None


def caption(result: JobResult, requester: str = "", *, md: bool = False) -> str:
    """Under the image: prompt, then seed · steps · size · time · who asked."""
    r = result.request
    prompt = safe_text(r.prompt, md=md, limit=CAPTION_PROMPT_CHARS)
    seeds = _("seed {seed}").format(seed=r.seed) if r.count == 1 else \
        _("{count} images, seeds {first}–{last}").format(count=r.count, first=r.seed,
                                                          last=r.seeds[-1])
    facts = [seeds, steps(r.steps), f"{r.width}×{r.height}"]
    if r.derived_from:
        facts.insert(0, safe_text(derived_from(r.derived_from), md=md, limit=64))
    if r.init_image:
        facts.append(_("strength {value}").format(value=f"{r.strength:g}"))
    if r.guidance != 3.5:
        facts.append(_("guidance {value}").format(value=f"{r.guidance:g}"))
    if result.seconds:
        facts.append(_("{n} s").format(n=f"{result.seconds:.1f}"))
    if requester:
        facts.append(_("asked by {name}").format(name=safe_text(requester, md=md, limit=64)))
    return f"{prompt}\n{' · '.join(facts)}"


def derived_from(source: Source) -> str:
    """Which image a variation or an upscale came from, in the reader's language."""
    if source.action == "variation":
        return _("variation ({kind}) of {job} #{number}").format(
            kind=_kind(source.detail), job=source.job_id, number=source.number)
    return _("upscale {factor}× of {job} #{number}").format(
        factor=source.detail, job=source.job_id, number=source.number)


def vary_needs_a_finished_job() -> str:
    return _("⚠️ I could not find a finished job with that id to start from.")


def translated(text: str) -> str:
    """A sentence the engine stored or raised (a job's failure, an error without fields): its
    words in the reader's language where the catalogue has it, else as it is."""
    return _(text) if text else text  # gettext("") would be the catalogue's header


def failed(event: Failed) -> str:
    """A failed job: its phrase in the reader's language where the engine gave one (a job
    failed in this process), else its journalled sentence looked up in the catalogue."""
    text = event.phrase.say(_, ngettext) if event.phrase else translated(event.reason)
    return f"⚠️ {text}"


def cancelled(by_owner: bool = True) -> str:
    return _("🛑 Cancelled.") if by_owner else _("🛑 Cancelled by an admin.")


def error_text(exc: EngineError) -> str:
    """An engine error in the reader's language: its phrase said with the reader's catalogue
    (its parts, such as 'the seed option' or '12 minutes', too; ``engine/errors.py``)."""
    phrase = getattr(exc, "phrase", None)
    if phrase is None:  # an error made without EngineError.__init__
        return translated(str(exc))
    return phrase.say(_, ngettext)


def error(exc: EngineError) -> str:
    return f"⚠️ {error_text(exc)}"


def conflicts_note(names: list[str]) -> str:
    if not names:
        return ""
    joined = ", ".join(names)
    return _("(The --flags in your prompt were used instead of the {names} option.)").format(
        names=joined)


def not_your_job() -> str:
    return _("This is not your job: only the person who asked can use these buttons.")


def quota(q: Quota, now: float, limits: LimitsSection | None = None) -> str:
    """/limits: the window's balance, the last 24 hours' where capped; under gpu_seconds in
    images of the default size (``limits`` names that size)."""
    if q.limit is None:
        text = _("You have no image limit here.") if q.day is None else \
            _("You have no limit per window here.")
    else:
        text = _("You have {balance} left.").format(balance=_balance(q))
        if q.resets_at is not None and q.remaining is not None and q.remaining < q.limit:
            wait = duration(q.resets_at - now)
            text += " " + (_("An image's worth frees up in {time}.") if q.priced
                           else _("The next one frees up in {time}.")).format(time=wait)
    if q.day is not None:
        text += " " + _("Over the last 24 hours: {balance} left.").format(balance=_balance(q.day))
    if q.chat is not None:  # the server's or group's window, shared by everyone in it
        shared = (_("This server has {balance} left for everyone in it.") if q.chat_word ==
                  "server" else _("This group has {balance} left for everyone in it."))
        text += " " + shared.format(balance=_balance(q.chat))
    if q.priced and limits is not None:
        text += " " + _("(An image's worth is one {width}×{height} image at {steps}; bigger "
                        "images and more steps cost more.)").format(
            width=limits.width_default, height=limits.height_default,
            steps=steps(limits.steps_default))
    return text


def _balance(q: Quota) -> str:
    """'3 of 10 images', or priced '7.5 of 10 images' worth' (what is left rounded down)."""
    if q.priced:
        return _("{left} of {limit} images' worth").format(
            left=amount(q.remaining or 0.0, up=False), limit=f"{q.limit:g}")
    return _("{left} of {limit} images").format(left=q.remaining, limit=q.limit)


# the periods of engine/stats.py, each as the start of a /stats block
_PERIOD_NAMES = {"the last day": N_("The last day"), "the last 7 days": N_("The last 7 days")}


def stats(usage: UsageStats, *, private: bool = True, md: bool = False) -> str:
    """/stats for an admin. Outside a private answer it names users by display name only and
    shows no error text (as ``status``)."""
    blocks = []
    for p in usage.periods:
        failed = _("{n} failed").format(n=p.failures) if p.failures else _("none failed")
        named = _PERIOD_NAMES.get(p.label)
        made = ngettext("📊 {period}: {images} image made ({jobs} asked for), GPU {gpu}, "
                        "{failed}",
                        "📊 {period}: {images} images made ({jobs} asked for), GPU {gpu}, "
                        "{failed}", p.images)
        lines = [made.format(period=_(named) if named else p.label.capitalize(),
                             images=p.images, jobs=p.jobs, gpu=_seconds(p.gpu_s),
                             failed=failed),
                 _("Median wait in the queue {wait} · median GPU time per image "
                   "{per_image}").format(wait=_seconds(p.wait_p50_s),
                                         per_image=_seconds(p.per_image_p50_s))]
        if p.top_users:
            lines.append(_("Top users: {users}").format(users=", ".join(
                _("{name} {images} ({gpu})").format(name=_who(u.name, u.key, private, md),
                                                    images=u.images, gpu=_seconds(u.gpu_s))
                for u in p.top_users)))
        if p.causes and private:
            lines.append(_("Failures: {causes}").format(causes="; ".join(
                f"{safe_text(translated(cause), md=md, limit=80)} ×{n}"
                for cause, n in p.causes)))
        elif p.causes:
            lines.append(_("Failures: their causes are in a private /stats."))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _who(name: str, key: str, private: bool, md: bool) -> str:
    shown = safe_text(name, md=md, limit=32) or (_("someone") if not private else "")
    return f"{shown} ({key})".strip() if private else shown


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return _("{n} s").format(n=f"{value:.1f}") if value < 60 else duration(value)


def queue_list(jobs: list[Job]) -> str:
    if not jobs:
        return _("You have no images waiting.")
    lines = []
    for job in jobs:
        where = _("drawing now") if job.position() is None else \
            _("number {position} in line").format(position=job.position())
        lines.append(f"• {job.id}: {safe_text(job.request.prompt, limit=60)} — {where}")
    return _("Your images:") + "\n" + "\n".join(lines)


def status(health: Health, *, private: bool = True, now: float | None = None) -> str:
    """/status for an admin. Outside a private chat (a group where everyone reads along) it
    names no user, no error text and no worker's name or job (host names): those go to the
    log and to a private /status."""
    if health.running is None:
        running = _("Running: nothing")
    elif private:
        running = _("Running: {job} for {user}").format(job=health.running.id,
                                                        user=health.running.user.key)
    else:
        running = _("Running: job {job}").format(job=health.running.id)
    if not health.last_error:
        last_error = _("Last error: none")
    elif private:
        last_error = _("Last error: {error}").format(error=health.last_error)
    else:
        last_error = _("Last error: one (ask /status in a private chat)")
    lines = [
        (_("Queue: {n} waiting (paused)") if health.paused
         else _("Queue: {n} waiting")).format(n=health.queued),
        running,
        _("Done: {finished} finished, {failed} failed").format(finished=health.finished,
                                                               failed=health.failed),
        last_error,
    ]
    if health.memory:
        mem = ", ".join(f"{k} {v:.1f}" for k, v in sorted(health.memory.items()))
        lines.append(_("GPU memory: {memory}").format(memory=mem))
    if health.model is not None:
        lines.append(model_line(health.model))
    if health.workers:
        lines.append(_("Workers: {n}").format(n=len(health.workers)))
        lines += workers_list(list(health.workers), now=now, private=private)
    return "\n".join(lines)


def model_line(state: ModelState) -> str:
    """/status: the memory plan, how much of the DiT stays on the GPU, and whether its blocks
    are compiled (eager blocks after a failed compile make every image slower)."""
    parts = [_("preset {preset}").format(preset=state.preset)]
    if not state.loaded:
        parts.append(_("not loaded: the next image loads it again"))
    elif state.dit_blocks is not None and state.dit_blocks_on_gpu is not None:
        parts.append(_("{on_gpu} of {blocks} DiT blocks on the GPU").format(
            on_gpu=state.dit_blocks_on_gpu, blocks=state.dit_blocks))
    if state.compiled:
        parts.append(_("compiled"))
    elif state.compile_failed:
        parts.append(_("not compiled: compiling failed, images are slower (see the log)"))
    return _("Model: {state}").format(state=" · ".join(parts))


def workers_list(workers: list[WorkerInfo], *, now: float | None = None,
                 private: bool = True) -> list[str]:
    """One line per GPU worker of a cluster (``/status``, ``doctor``). ``seen`` is the worker's
    own clock: a host whose clock is off shows a wrong age, never a negative one."""
    now = time.time() if now is None else now
    lines = []
    for number, w in enumerate(workers, start=1):
        name = safe_text(w.name, limit=64) if private else \
            _("worker {number}").format(number=number)
        side = math.isqrt(w.max_pixels)
        largest = f"{side}×{side}" if side * side == w.max_pixels else \
            _("{pixels} px").format(pixels=f"{w.max_pixels:,}")
        if not w.running:
            doing = _("idle")
        elif private:
            doing = _("running {job}").format(job=w.running)
        else:
            doing = _("busy")
        lines.append(_("• {name} — {gpu}: largest {largest}, {count} at once, styles: {styles}; "
                       "{done} done, {doing}, seen {seen} s ago").format(
            name=name, gpu=safe_text(w.gpu, limit=64), largest=largest, count=w.max_count,
            styles=", ".join(w.styles) if w.styles else _("none"), done=w.jobs_done,
            doing=doing, seen=f"{max(0.0, now - w.seen_at):.0f}"))
    return lines


def usage(limits: LimitsSection) -> str:
    """/help: the commands, then the grammar's own option summary."""
    lines = [_(line).format(**fields) for line, fields in usage_lines(limits)]
    lines.append(_("To start from a picture: Discord's image option, or in Telegram a photo "
                   "with /imagine … as its caption (or /imagine … as a reply to one)."))
    lines.append(_("Also: /queue (your images), /cancel [id], /limits (images left), "
                   "/language (admins: this chat's language)."))
    return "\n".join(lines)


# -- added for the chat adapters' commands and buttons (Telegram first) ---------------------------
def admin_only() -> str:
    return _("Sorry, only the bot's admins can use this command.")


def chat_not_allowed() -> str:
    return _("Sorry, this bot is not enabled in this chat.")


def internal_error() -> str:
    return _("⚠️ Something went wrong on my side; the bot's admin can find the details in the "
             "log.")


def unknown_command(word: str, known: list[str]) -> str:
    return _("I do not know {word}. Commands: /imagine <prompt>, {commands}, /quit.").format(
        word=safe_text(word, limit=40), commands=", ".join(known))


def cancel_answer(job_id: str | None, done: bool) -> str:
    """/cancel's answer: nothing of theirs to cancel, cancelling, or already over."""
    if job_id is None:
        return queue_list([])
    return cancelling(job_id) if done else already_over()


def cancelling(job_id: str) -> str:
    return _("Cancelling {job}.").format(job=job_id)


def already_over() -> str:
    return _("That job has already finished.")


def queue_paused() -> str:
    return _("⏸ The queue is paused: new images are accepted but none starts until /resume.")


def queue_resumed() -> str:
    return _("▶️ The queue is running again.")


def limit_usage() -> str:
    return _("Usage: /limit <user id> <images per window | 0 (none) | unlimited | default>")


def limit_set(user_id: str, images: int | None) -> str:
    if images is None:
        return _("User {user} is back to the default image limit.").format(user=user_id)
    if images == 0:
        return _("User {user} may not make images for now (limit 0; `default` lifts it).").format(
            user=user_id)
    if images < 0:
        return _("User {user} may now make images without a limit.").format(user=user_id)
    return _("User {user} may now make {n} images per window.").format(user=user_id, n=images)


def rerolling(seed: int) -> str:
    return _("🎲 Re-rolling with seed {seed}.").format(seed=seed)


# -- the image actions of issue 12 (Telegram's buttons) -------------------------------------------
def _kind(kind: str) -> str:
    return _("subtle") if kind == "subtle" else _("strong") if kind == "strong" else kind


def vary_label(kind: str) -> str:
    return _("Vary ({kind})").format(kind=_kind(kind))


def upscale_label() -> str:
    return _("⤢ Upscale 2×")


def upscaling(number: int, width: int, height: int) -> str:
    return _("⤢ Upscaling image {number} to {width}×{height}.").format(
        number=number, width=width, height=height)


def grid_actions(count: int) -> str:
    """The message under a grid that carries its buttons (an album cannot carry any)."""
    return _("U1–U{count}: post that image alone as a full-size PNG · "
             "V1–V{count}: a subtle variation of it.").format(count=count)


def posting_alone(number: int) -> str:
    return _("📤 Posting image {number} as a full-size PNG.").format(number=number)


def varying(kind: str, number: int, seed: int) -> str:
    return _("🔀 A {kind} variation of image {number}, seed {seed}.").format(
        kind=_kind(kind), number=number, seed=seed)


def more_steps_queued(steps_now: int) -> str:
    return _("➕ The same seed again with {steps}.").format(steps=steps(steps_now))


def blocked(count: int = 1) -> str:
    """A result the NSFW check held back entirely (``[moderation] policy = "block"``)."""
    if count == 1:
        return _("🚫 Your image was not posted: the bot's image check found it not suitable "
                 "for this chat. Please try a different prompt.")
    return _("🚫 All {count} of your images were not posted: the bot's image check found them "
             "not suitable for this chat. Please try a different prompt.").format(count=count)


def partly_blocked(result: JobResult) -> str:
    """The line under a grid some of whose images the NSFW check held back."""
    numbers = [str(i) for i, image in enumerate(result.images, start=1) if image.blocked]
    if len(numbers) == 1:
        return _("🚫 Image {number} was not posted (held back by the bot's image check).").format(
            number=numbers[0])
    return _("🚫 Images {numbers} were not posted (held back by the bot's image check).").format(
        numbers=", ".join(numbers))


def blocked_alone(number: int) -> str:
    """U on an image the NSFW check holds back in this chat."""
    return _("🚫 Image {number} is not posted here: the bot's image check held it back.").format(
        number=number)


def image_gone() -> str:
    return _("That image is no longer kept by the bot, so this button cannot be used.")


def job_unknown() -> str:
    return _("I no longer know that image, so this button cannot be used.")


def undelivered(give_up_after_s: float | None = None) -> str:
    """Said once the quick retries failed; the bot keeps trying in the background."""
    if give_up_after_s is None:
        return _("⚠️ Your image is ready but could not be uploaded; the bot will try again "
                 "later.")
    return _("⚠️ Your image is ready but could not be uploaded yet; the bot keeps trying for "
             "up to {time} after you asked.").format(time=duration(give_up_after_s))


def gave_up_delivery() -> str:
    return _("⚠️ Your image could not be uploaded, and the bot has stopped trying.")


def restarted_ask_again() -> str:
    """To a command that arrived just before a crash, so it was never queued."""
    return _("⚠️ The bot restarted before it could take this request; please ask again.")


# -- added for the Discord adapter ----------------------------------------------------------------
def button_label(action: str, number: int | None = None) -> str:
    """The label of an image button: "reroll", "more" (same seed, more steps) or "cancel";
    "u" or "v" with the number of an image of a grid: "U3" (it alone), "V2" (a variation)."""
    if number is not None:
        return f"{action.upper()}{number}"
    labels = {"reroll": _("🎲 Re-roll"), "more": _("Same seed, more steps"),
              "cancel": _("Cancel")}
    return labels[action]


def addressed(mention: str, text: str) -> str:
    """A message for one user outside their own interaction (e.g. a result after a restart)."""
    return f"{mention} {text}"


def styles_list(styles: dict[str, StyleSection]) -> str:
    """/styles: every configured LoRA style with its one-line description."""
    if not styles:
        return _("This bot has no styles set up.")
    lines = [_("Styles: add --style <name> to /imagine.")]
    for name in sorted(styles):
        about = styles[name].description
        lines.append(f"  --style {name}" + (f" — {about}" if about else ""))
    return "\n".join(lines)


# -- /language (issue 15) -------------------------------------------------------------------------
LANGUAGE_NAMES = {"en": "English", "zh": "中文"}  # each in its own words


def language_set(language: str | None) -> str:
    if language is None:
        return _("Replies in this chat now follow each person's own language.")
    return _("Replies in this chat are now in {language}.").format(
        language=LANGUAGE_NAMES[language])


def language_usage(current: str | None) -> str:
    now = LANGUAGE_NAMES[current] if current else _("each person's own language")
    return _("Usage: /language zh|en|auto (admins): the language of the bot's replies in this "
             "chat. Now: {language}.").format(language=now)


# -- the console (bot/console.py): what it says besides the chat platforms' replies ---------------
def console_greeting() -> str:
    return _("Type /imagine <prompt> [--seed N] [--steps N] [--ar W:H] [--n N] [--image FILE "
             "[--strength X]], /vary, /upscale, /queue, /cancel [id], /limits, /status, /stats, "
             "/pause, /resume, /limit, /styles, /language, /help or /quit.")


def console_internal_error() -> str:
    return _("⚠️ Something went wrong; see the log.")


def console_limit_usage() -> str:
    return _("Usage: /limit <discord|telegram>:<user id> <images per window | 0 (none) | "
             "unlimited | default>")


def console_vary_usage() -> str:
    return _("Usage: /vary <job id> <image number> [subtle|strong]")


def console_upscale_usage() -> str:
    return _("Usage: /upscale <job id> <image number>")


def console_accepted(job_id: str, request: ImageRequest) -> str:
    """A job the console queued: its id (for /cancel, /vary, /upscale) and what it will make."""
    if request.count == 1:
        return _("Job {job}: seed {seed}, {steps} steps, {width}×{height}.").format(
            job=job_id, seed=request.seed, steps=request.steps, width=request.width,
            height=request.height)
    return _("Job {job}: seeds {first}–{last}, {steps} steps, {width}×{height}.").format(
        job=job_id, first=request.seed, last=request.seeds[-1], steps=request.steps,
        width=request.width, height=request.height)


def console_saved(job_id: str, path: str) -> str:
    return _("[{job}] saved to {path}").format(job=job_id, path=path)
