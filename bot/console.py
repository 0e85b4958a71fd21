"""The console adapter: type ``/imagine ...`` lines; images go to the output folder.

It needs no token, so a new admin sees the bot work before creating a Discord or Telegram app.
The person at the keyboard owns the machine, so the console user counts as an admin. The console
is one chat (``console:local``): ``/language zh|en|auto`` sets its replies' language, as an admin
does in a Discord channel or a Telegram chat, so every reply can be read without a chat token.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TextIO

from bot import i18n, language, render
from bot.admin_args import parse_limit_value
from bot.followers import Followers
from bot.throttle import Throttle
from engine import input_image, variants
from engine.engine import Engine
from engine.errors import N_, EngineError, InvalidCommand
from engine.grammar import parse_command
from engine.job import Cancelled, Failed, Finished, Job, Progress
from engine.request import ImageRequest, Origin, User
from engine.store import JobRecord

log = logging.getLogger(__name__)
CONSOLE_USER = User("console", "local", "console")
CONSOLE_CHAT = "local"  # the console's one chat, for its language (``console:local``)
PROMPT = "imagine> "
# The console's attachment: ``--image FILE`` or ``--image "FILE WITH SPACES"`` (not grammar: in a
# chat the picture comes with the message, not in its text)
IMAGE_OPTION = re.compile(r'(?:^|\s)--image(?:\s+|=)(?:"([^"]+)"|(?!--)(\S+))', re.IGNORECASE)
IMAGE_MENTION = re.compile(r"(?:^|\s)--image\b", re.IGNORECASE)


class ConsoleAdapter:
    name = "console"

    def __init__(self, engine: Engine, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
                 on_quit: Callable[[], None] | None = None,
                 progress_interval_s: float = 1.0) -> None:
        self.engine = engine
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.on_quit = on_quit
        self.progress_interval_s = progress_interval_s
        self._reader: asyncio.Task[None] | None = None
        self.followers = Followers()
        self.closed_at_start = False  # stdin was at its end before the first line

    async def start(self) -> None:
        with i18n.using(await self._language()):
            self.say(render.console_greeting())
        for job in self.engine.recovered_jobs("console"):
            self._watch(job, recovered=True)
        self._reader = asyncio.create_task(self._read_lines(), name="console-reader")

    async def finish_answers(self, timeout: float) -> int:
        """At shutdown: let the answers being printed finish (see ``bot.followers``)."""
        return await self.followers.finish_answers(timeout)

    async def stop(self) -> None:
        if self._reader:
            self._reader.cancel()
        await self.followers.cancel_all()

    def say(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)

    def _start_reader_thread(self) -> asyncio.Queue[str]:
        """Read stdin on a daemon thread: a blocked readline must never hold up shutdown."""
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str] = asyncio.Queue()

        def pump() -> None:
            while True:
                line = self.stdin.readline()
                try:
                    loop.call_soon_threadsafe(lines.put_nowait, line)
                except RuntimeError:  # the loop has closed: the bot is gone
                    return
                if not line:
                    return

        threading.Thread(target=pump, name="console-stdin", daemon=True).start()
        return lines

    async def _read_lines(self) -> None:
        lines = self._start_reader_thread()
        read = 0
        while True:
            line = await lines.get()
            if not line and read == 0:  # closed from the start: nobody can type here
                self.closed_at_start = True
                log.error("standard input is closed and no chat token is set: nothing to "
                          "serve. Set DISCORD_TOKEN or TELEGRAM_TOKEN (docker run -e ...), or "
                          "start the bot in a terminal (docker run -it) for the console.")
            read += 1
            if not line:  # end of input
                await self._drain()
                if self.on_quit:
                    self.on_quit()
                return
            try:
                if await self.handle_line(line.strip()) is False:
                    if self.on_quit:
                        self.on_quit()
                    return
            except EngineError as exc:
                self.say(render.error(exc))
            except Exception:  # a console typo must never stop the bot
                log.exception("console command failed")
                self.say(render.console_internal_error())

    async def handle_line(self, line: str) -> bool | None:
        """Handle one line; returns False for /quit. Every command of the chat adapters works
        here (the person at the keyboard is an admin); a plain line is a prompt."""
        if not line:
            return None
        i18n.use(await self._language())  # for this line's answers and its job's
        word = line.split(maxsplit=1)[0].lower()
        rest = line[len(word):].strip()
        if word in ("/quit", "/exit"):
            return False
        command = self._commands().get(word)
        if command is not None:
            await command(rest)
        elif word.startswith("/") and word != "/imagine":
            self.say(render.unknown_command(word, sorted(self._commands())))
        else:
            await self.imagine(line)
        return None

    def _commands(self) -> dict[str, Callable[[str], Awaitable[None]]]:
        return {"/help": self._help, "/queue": self._queue, "/limits": self._limits,
                "/status": self._status, "/stats": self._stats, "/cancel": self._cancel,
                "/pause": self._pause, "/resume": self._resume, "/limit": self._limit,
                "/vary": self._vary, "/upscale": self._upscale, "/styles": self._styles,
                "/language": self._set_language}

    async def _language(self) -> str:
        """The console's language: its own (``/language``), else ``[bot] default_language``."""
        return await language.for_chat(self.engine, self.engine.config, "console",
                                       CONSOLE_CHAT, None)

    async def _set_language(self, rest: str) -> None:
        """/language zh|en|auto: the console's replies (auto: the default language)."""
        self.say(await language.set_for_chat(self.engine, "console", CONSOLE_CHAT,
                                             rest.split()[0] if rest else ""))

    async def _help(self, rest: str) -> None:
        self.say(render.usage(self.engine.config.limits))

    async def _styles(self, rest: str) -> None:
        self.say(render.styles_list(self.engine.config.styles))

    async def _queue(self, rest: str) -> None:
        self.say(render.queue_list(self.engine.jobs_of(CONSOLE_USER)))

    async def _limits(self, rest: str) -> None:
        self.say(render.quota(await self.engine.quota(CONSOLE_USER), self.engine.clock(),
                              self.engine.config.limits))

    async def _status(self, rest: str) -> None:
        self.say(render.status(self.engine.health()))

    async def _stats(self, rest: str) -> None:
        self.say(render.stats(await self.engine.stats()))

    async def _cancel(self, rest: str) -> None:
        """/cancel [id]: the latest of the console's jobs when no id is given (as Telegram)."""
        job_id = rest.split()[0][:32] if rest else ""
        self.say(render.cancel_answer(*await self.engine.cancel_named_or_latest(job_id,
                                                                                CONSOLE_USER)))

    async def _pause(self, rest: str) -> None:
        self.engine.pause()
        self.say(render.queue_paused())

    async def _resume(self, rest: str) -> None:
        self.engine.resume()
        self.say(render.queue_resumed())

    async def _limit(self, rest: str) -> None:
        """/limit <platform:user id> <n|0|unlimited|default>, e.g. /limit telegram:42 5."""
        parts = rest.split()
        platform, _, user_id = parts[0].partition(":") if parts else ("", "", "")
        ok, images = parse_limit_value(parts[1]) if len(parts) == 2 else (False, None)
        if not (ok and platform in ("discord", "telegram") and user_id.isdigit()):
            self.say(render.console_limit_usage())
            return
        await self.engine.set_limit_override(User(platform, user_id), images)
        self.say(render.limit_set(f"{platform}:{user_id}", images))

    async def _vary(self, rest: str) -> None:
        """/vary <job id> <image 1–N> [subtle|strong]: what the V buttons do in a chat."""
        parts = rest.split()
        record = await self._finished(parts, render.console_vary_usage(), (2, 3))
        if record is not None:
            kind = parts[2].lower() if len(parts) == 3 else "subtle"
            await self._submit(variants.vary(record.request, record.job_id, record.result_path,
                                             int(parts[1]) - 1, kind, self.engine.config.limits))

    async def _upscale(self, rest: str) -> None:
        """/upscale <job id> <image 1–N>: what the Upscale buttons do in a chat."""
        parts = rest.split()
        record = await self._finished(parts, render.console_upscale_usage(), (2,))
        if record is not None:
            await self._submit(variants.upscale(record.request, record.job_id,
                                                record.result_path, int(parts[1]) - 1,
                                                self.engine.config.limits))

    async def _finished(self, parts: list[str], usage: str,
                        lengths: tuple[int, ...]) -> JobRecord | None:
        """The finished job ``parts`` name (an id, then an image number), or None (said why)."""
        if len(parts) not in lengths or not parts[1].isdigit():
            self.say(usage)
            return None
        record = await self.engine.job_record(parts[0][:32])
        if record is None or record.status != "finished":
            self.say(render.vary_needs_a_finished_job())
            return None
        return record

    async def imagine(self, text: str) -> Job:
        """``/imagine …``; ``--image FILE`` (the console's attachment, anywhere after the prompt,
        the path in double quotes if it has spaces) starts from that picture."""
        limits = self.engine.config.limits
        text, picture = _without_image_option(text)
        parsed = parse_command(text, limits)
        if picture is None:
            return await self._submit(parsed.to_request(limits))
        data = await asyncio.to_thread(input_image.read_file, picture, limits)
        folder = input_image.inputs_folder(self.engine.config.engine.output_dir)
        request = await asyncio.to_thread(input_image.request_for, parsed, data, limits, folder)
        return await self._submit(request, own_picture=True)

    async def _submit(self, request: ImageRequest, *, own_picture: bool = False) -> Job:
        """``own_picture``: the request's start picture was saved for it (``--image``) and goes
        if the engine refuses the job (a variation's start is an earlier job's image: kept)."""
        with input_image.discarded_if_refused(request.init_image if own_picture else ""):
            job = await self.engine.submit(CONSOLE_USER, request,
                                           Origin("console", extra=language.remembered({})))
        self.say(render.console_accepted(job.id, request))
        self._watch(job)
        return job

    def _watch(self, job: Job, *, recovered: bool = False) -> None:
        """``recovered``: a job from before a restart, said in the console's language."""
        self.followers.spawn(self._follow(job, recovered), job, f"console-{job.id}")

    async def _follow(self, job: Job, recovered: bool = False) -> None:
        if recovered:
            await language.choose_for_job(self.engine, self.engine.config, job, CONSOLE_CHAT)
        throttle = Throttle(self.progress_interval_s)
        async for event in job.events():
            text = render.job_status(event, job.request)
            if text is not None:
                last_step = isinstance(event, Progress) and event.step == event.total
                if not isinstance(event, Progress) or throttle.ready(force=last_step):
                    self.say(f"[{job.id}] {text}")
            elif isinstance(event, Finished):
                files = "\n".join(render.console_saved(job.id, str(image.path))
                                  for image in event.result.images)
                self.say(f"[{job.id}] ✅ {render.caption(event.result)}\n{files}")
                # the saved file is what the console delivers: kept even without save_outputs
                await self.engine.mark_delivered(job, f"console:{event.result.path}",
                                                 keep_file=True)
            elif isinstance(event, Failed):
                self.say(f"[{job.id}] {render.failed(event)}")
                await self.engine.mark_delivered(job, "console")
            elif isinstance(event, Cancelled):
                self.say(f"[{job.id}] {render.cancelled(event.by_owner)}")

    async def _drain(self) -> None:
        """At end of input (a pipe), wait for the jobs already asked for."""
        await self.followers.wait_all()


def _without_image_option(text: str) -> tuple[str, str | None]:
    """``text`` without its ``--image FILE`` (or ``--image=FILE``), and the FILE (None without
    one); ``--image`` given twice or without a file is refused in a sentence."""
    match = IMAGE_OPTION.search(text)
    rest = text if match is None else text[:match.start()] + " " + text[match.end():]
    if IMAGE_MENTION.search(rest):
        raise InvalidCommand(N_("Please give --image once, followed by the picture's path (in "
                                "double quotes if it has spaces)."))
    return (text, None) if match is None else (rest.strip(), match.group(1) or match.group(2))
