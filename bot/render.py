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

from engine.cluster.messages import WorkerInfo
from engine.config import LimitsSection, StyleSection
from engine.engine import Health
from engine.errors import EngineError
from engine.grammar import clean_prompt
from engine.grammar import usage as grammar_usage
from engine.job import Job, JobEvent, JobResult, Progress, Queued, Started
from engine.quota_text import amount
from engine.rate_limit import Quota
from engine.request import ImageRequest
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
        return f"{max(1, math.ceil(seconds))} s"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    return f"{hours} h {rest} min" if rest else f"{hours} h"


def queued(position: int | None) -> str:
    if not position or position <= 1:
        return "⏳ Queued: you are next."
    return f"⏳ Queued: number {position} in line."


def steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def started(request: ImageRequest) -> str:
    return f"🎨 Drawing… ({steps(request.steps)})"


def progress(step: int, total: int, eta_s: float | None) -> str:
    bar_len = 10
    filled = round(bar_len * step / total) if total else 0
    bar = "▰" * filled + "▱" * (bar_len - filled)
    if eta_s is None or step >= total:
        eta = ""
    elif eta_s < 1.5:
        eta = ", nearly done"  # "about 1 s left" on a 0.3 s job read as a promise
    else:
        eta = f", about {duration(eta_s)} left"
    return f"🎨 {bar} step {step}/{total}{eta}"


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
    seeds = f"seed {r.seed}" if r.count == 1 else f"{r.count} images, seeds {r.seed}–{r.seeds[-1]}"
    facts = [seeds, steps(r.steps), f"{r.width}×{r.height}"]
    if r.derived_from:
        facts.insert(0, safe_text(r.derived_from, md=md, limit=64))
    if r.init_image:
        facts.append(f"strength {r.strength:g}")
    if r.guidance != 3.5:
        facts.append(f"guidance {r.guidance:g}")
    if result.seconds:
        facts.append(f"{result.seconds:.1f} s")
    if requester:
        facts.append(f"asked by {safe_text(requester, md=md, limit=64)}")
    return f"{prompt}\n{' · '.join(facts)}"


def vary_needs_a_finished_job() -> str:
    return "⚠️ I could not find a finished job with that id to start from."


def failed(reason: str) -> str:
    return f"⚠️ {reason}"


def cancelled(by_owner: bool = True) -> str:
    return "🛑 Cancelled." if by_owner else "🛑 Cancelled by an admin."


def error(exc: EngineError) -> str:
    return f"⚠️ {exc}"


def conflicts_note(names: list[str]) -> str:
    if not names:
        return ""
    joined = ", ".join(names)
    return f"(The --flags in your prompt were used instead of the {joined} option.)"


def not_your_job() -> str:
    return "This is not your job: only the person who asked can use these buttons."


def quota(q: Quota, now: float, limits: LimitsSection | None = None) -> str:
    """/limits: the window's balance, the last 24 hours' where capped; under gpu_seconds in
    images of the default size (``limits`` names that size)."""
    if q.limit is None:
        text = "You have no image limit here." if q.day is None else \
            "You have no limit per window here."
    else:
        text = f"You have {_balance(q)} left."
        if q.resets_at is not None and q.remaining is not None and q.remaining < q.limit:
            what = "An image's worth" if q.priced else "The next one"
            text += f" {what} frees up in {duration(q.resets_at - now)}."
    if q.day is not None:
        text += f" Over the last 24 hours: {_balance(q.day)} left."
    if q.priced and limits is not None:
        text += (f" (An image's worth is one {limits.width_default}×{limits.height_default} "
                 f"image at {steps(limits.steps_default)}; bigger images and more steps cost "
                 "more.)")
    return text


def _balance(q: Quota) -> str:
    """'3 of 10 images', or priced '7.5 of 10 images' worth' (what is left rounded down)."""
    if q.priced:
        return f"{amount(q.remaining or 0.0, up=False)} of {q.limit:g} images' worth"
    return f"{q.remaining} of {q.limit} images"


def stats(usage: UsageStats, *, private: bool = True, md: bool = False) -> str:
    """/stats for an admin. Outside a private answer it names users by display name only and
    shows no error text (as ``status``)."""
    blocks = []
    for p in usage.periods:
        failed = f"{p.failures} failed" if p.failures else "none failed"
        lines = [f"📊 {p.label.capitalize()}: {p.images} images made ({p.jobs} asked for), "
                 f"GPU {_seconds(p.gpu_s)}, {failed}",
                 f"Median wait in the queue {_seconds(p.wait_p50_s)} · median GPU time per "
                 f"image {_seconds(p.per_image_p50_s)}"]
        if p.top_users:
            lines.append("Top users: " + ", ".join(
                f"{_who(u.name, u.key, private, md)} {u.images} ({_seconds(u.gpu_s)})"
                for u in p.top_users))
        if p.causes and private:
            lines.append("Failures: " + "; ".join(
                f"{safe_text(cause, md=md, limit=80)} ×{n}" for cause, n in p.causes))
        elif p.causes:
            lines.append("Failures: their causes are in a private /stats.")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _who(name: str, key: str, private: bool, md: bool) -> str:
    shown = safe_text(name, md=md, limit=32) or ("someone" if not private else "")
    return f"{shown} ({key})".strip() if private else shown


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f} s" if value < 60 else duration(value)


def queue_list(jobs: list[Job]) -> str:
    if not jobs:
        return "You have no images waiting."
    lines = []
    for job in jobs:
        where = "drawing now" if job.position() is None else f"number {job.position()} in line"
        lines.append(f"• {job.id}: {safe_text(job.request.prompt, limit=60)} — {where}")
    return "Your images:\n" + "\n".join(lines)


def status(health: Health, *, private: bool = True, now: float | None = None) -> str:
    """/status for an admin. Outside a private chat (a group where everyone reads along) it
    names no user, no error text and no worker's name or job (host names): those go to the
    log and to a private /status."""
    if health.running is None:
        running = "nothing"
    elif private:
        running = f"{health.running.id} for {health.running.user.key}"
    else:
        running = f"job {health.running.id}"
    if private:
        last_error = health.last_error or "none"
    else:
        last_error = "one (ask /status in a private chat)" if health.last_error else "none"
    lines = [
        f"Queue: {health.queued} waiting{' (paused)' if health.paused else ''}",
        f"Running: {running}",
        f"Done: {health.finished} finished, {health.failed} failed",
        f"Last error: {last_error}",
    ]
    if health.memory:
        mem = ", ".join(f"{k} {v:.1f}" for k, v in sorted(health.memory.items()))
        lines.append(f"GPU memory: {mem}")
    if health.workers:
        lines.append(f"Workers: {len(health.workers)}")
        lines += workers_list(list(health.workers), now=now, private=private)
    return "\n".join(lines)


def workers_list(workers: list[WorkerInfo], *, now: float | None = None,
                 private: bool = True) -> list[str]:
    """One line per GPU worker of a cluster (``/status``, ``doctor``). ``seen`` is the worker's
    own clock: a host whose clock is off shows a wrong age, never a negative one."""
    now = time.time() if now is None else now
    lines = []
    for number, w in enumerate(workers, start=1):
        name = safe_text(w.name, limit=64) if private else f"worker {number}"
        side = math.isqrt(w.max_pixels)
        largest = f"{side}×{side}" if side * side == w.max_pixels else f"{w.max_pixels:,} px"
        styles_ = ", ".join(w.styles) if w.styles else "none"
        doing = "idle" if not w.running else (f"running {w.running}" if private else "busy")
        seen = max(0.0, now - w.seen_at)
        lines.append(f"• {name} — {safe_text(w.gpu, limit=64)}: largest {largest}, "
                     f"{w.max_count} at once, styles: {styles_}; {w.jobs_done} done, {doing}, "
                     f"seen {seen:.0f} s ago")
    return lines


def usage(limits: LimitsSection) -> str:
    """/help: the commands, then the grammar's own option summary."""
    return (grammar_usage(limits) + "\nTo start from a picture: Discord's image option, or in "
            "Telegram a photo with /imagine … as its caption (or /imagine … as a reply to one)."
            "\nAlso: /queue (your images), /cancel [id], /limits (images left).")


# -- added for the chat adapters' commands and buttons (Telegram first) ---------------------------
def admin_only() -> str:
    return "Sorry, only the bot's admins can use this command."


def chat_not_allowed() -> str:
    return "Sorry, this bot is not enabled in this chat."


def internal_error() -> str:
    return "⚠️ Something went wrong on my side; the bot's admin can find the details in the log."


def unknown_command(word: str, known: list[str]) -> str:
    return (f"I do not know {safe_text(word, limit=40)}. Commands: /imagine <prompt>, "
            + ", ".join(known) + ", /quit.")


def cancelling(job_id: str) -> str:
    return f"Cancelling {job_id}."


def already_over() -> str:
    return "That job has already finished."


def queue_paused() -> str:
    return "⏸ The queue is paused: new images are accepted but none starts until /resume."


def queue_resumed() -> str:
    return "▶️ The queue is running again."


def limit_usage() -> str:
    return "Usage: /limit <user id> <images per window | 0 (none) | unlimited | default>"


def limit_set(user_id: str, images: int | None) -> str:
    if images is None:
        return f"User {user_id} is back to the default image limit."
    if images == 0:
        return f"User {user_id} may not make images for now (limit 0; `default` lifts it)."
    if images < 0:
        return f"User {user_id} may now make images without a limit."
    return f"User {user_id} may now make {images} images per window."


def rerolling(seed: int) -> str:
    return f"🎲 Re-rolling with seed {seed}."


# -- the image actions of issue 12 (Telegram's buttons) -------------------------------------------
def vary_label(kind: str) -> str:
    return f"Vary ({kind})"


def upscale_label() -> str:
    return "⤢ Upscale 2×"


def upscaling(number: int, width: int, height: int) -> str:
    return f"⤢ Upscaling image {number} to {width}×{height}."


def grid_actions(count: int) -> str:
    """The message under a grid that carries its buttons (an album cannot carry any)."""
    return (f"U1–U{count}: post that image alone as a full-size PNG · "
            f"V1–V{count}: a subtle variation of it.")


def posting_alone(number: int) -> str:
    return f"📤 Posting image {number} as a full-size PNG."


def varying(kind: str, number: int, seed: int) -> str:
    return f"🔀 A {kind} variation of image {number}, seed {seed}."


def more_steps_queued(steps_now: int) -> str:
    return f"➕ The same seed again with {steps(steps_now)}."


def blocked(count: int = 1) -> str:
    """A result the NSFW check held back entirely (``[moderation] policy = "block"``)."""
    what = "Your image was" if count == 1 else f"All {count} of your images were"
    return (f"🚫 {what} not posted: the bot's image check found it not suitable for this chat. "
            "Please try a different prompt.")


def partly_blocked(result: JobResult) -> str:
    """The line under a grid some of whose images the NSFW check held back."""
    numbers = [str(i) for i, image in enumerate(result.images, start=1) if image.blocked]
    which = f"Image {numbers[0]} was" if len(numbers) == 1 \
        else f"Images {', '.join(numbers)} were"
    return f"🚫 {which} not posted (held back by the bot's image check)."


def blocked_alone(number: int) -> str:
    """U on an image the NSFW check holds back in this chat."""
    return f"🚫 Image {number} is not posted here: the bot's image check held it back."


def image_gone() -> str:
    return "That image is no longer kept by the bot, so this button cannot be used."


def job_unknown() -> str:
    return "I no longer know that image, so this button cannot be used."


def undelivered(give_up_after_s: float | None = None) -> str:
    """Said once the quick retries failed; the bot keeps trying in the background."""
    if give_up_after_s is None:
        return "⚠️ Your image is ready but could not be uploaded; the bot will try again later."
    return ("⚠️ Your image is ready but could not be uploaded yet; the bot keeps trying for up "
            f"to {duration(give_up_after_s)} after you asked.")


def gave_up_delivery() -> str:
    return "⚠️ Your image could not be uploaded, and the bot has stopped trying."


def restarted_ask_again() -> str:
    """To a command that arrived just before a crash, so it was never queued."""
    return "⚠️ The bot restarted before it could take this request; please ask again."


# -- added for the Discord adapter ----------------------------------------------------------------
_BUTTON_LABELS = {"reroll": "🎲 Re-roll", "more": "Same seed, more steps", "cancel": "Cancel"}


def button_label(action: str, number: int | None = None) -> str:
    """The label of an image button: "reroll", "more" (same seed, more steps) or "cancel";
    "u" or "v" with the number of an image of a grid: "U3" (it alone), "V2" (a variation)."""
    if number is not None:
        return f"{action.upper()}{number}"
    return _BUTTON_LABELS[action]


def addressed(mention: str, text: str) -> str:
    """A message for one user outside their own interaction (e.g. a result after a restart)."""
    return f"{mention} {text}"


def styles_list(styles: dict[str, StyleSection]) -> str:
    """/styles: every configured LoRA style with its one-line description."""
    if not styles:
        return "This bot has no styles set up."
    lines = ["Styles: add --style <name> to /imagine."]
    for name in sorted(styles):
        about = styles[name].description
        lines.append(f"  --style {name}" + (f" — {about}" if about else ""))
    return "\n".join(lines)
