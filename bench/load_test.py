"""Load test: many users send /imagine in bursts to Discord and Telegram at once; nothing is lost.

    /work/venv/bin/python -m bench.load_test                  # both runs, 200 users, 1,000 commands
    /work/venv/bin/python -m bench.load_test --run restart --users 20 --commands 100

The bot runs as its own process (``bench.load_bot_launcher``: the real ``python -m bot run`` on the
dry-run backend) against the fake Discord and Telegram servers of ``tests/fakes``, which run here
and record every call. Even users are on Discord (one guild channel), odd users on Telegram
(private chats); ``Scenario.plan`` says who sends when; commands go out ``burst_size`` at a time,
``burst_gap_s`` apart. The "restart" run SIGKILLs the bot after half the bursts and starts
it again on the same database before sending the rest. ``bench.load_report`` counts the outcome.

Acknowledgement latency: Discord, from the INTERACTION_CREATE dispatch to the deferral callback;
Telegram, from the update being served by getUpdates to the bot's first reply to that message
(the status message, the refusal, or the image itself for a job that finished before its status
message went out; the sendChatAction before a status message names no message and is not counted,
so this is an upper bound).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import load_report as report  # noqa: E402
from bench.load_bot_launcher import BotProcess  # noqa: E402
from bench.load_report import Command, Counts  # noqa: E402
from tests.fakes.discord_server import FakeDiscord, FakeUser  # noqa: E402
from tests.fakes.telegram_server import FakeTelegramServer  # noqa: E402

TG_TOKEN = "123456789:AAHfakeTokenForLoadTest_abcdefghijklmno"
TG_USER_BASE = 5_000_000
DISCORD_USER_BASE = 100_000_000_000_000_000


@dataclass(frozen=True)
class Scenario:
    users: int = 200
    commands: int = 1000
    burst_size: int = 100
    burst_gap_s: float = 2.0
    images_per_window: int = 3
    window_s: float = 3600.0  # longer than the run: the limit never slides during it
    max_queue_per_user: int = 3
    max_queue_total: int = 100
    step_s: float = 0.01
    steps: int = 4
    size: str = "256x256"
    restart: bool = False  # SIGKILL the bot after half the bursts, then start it again
    # ...at the moment a fake has just taken an upload (before the bot can journal it)
    kill_on_upload: bool = False
    settle_timeout_s: float = 300.0

    def plan(self) -> list[int]:
        """Who sends each command, in sending order.

        Users take turns in rounds. Half of them are "steady" (one command per round: their
        earlier images are usually done by their next command, so it is the rate limit that
        refuses those over the limit); the others are "flooders" (all their commands back to
        back in one round: the per-user queue cap refuses those over it). Shuffled within a round (fixed
        seed, so every run sends the same pattern).
        """
        share = [self.commands // self.users + (u < self.commands % self.users)
                 for u in range(self.users)]
        rounds = max(share)
        flooders = [u for u in range(self.users) if self.is_flooder(u)]
        order: list[int] = []
        for r in range(rounds):
            groups = [[u] for u in range(self.users) if not self.is_flooder(u) and share[u] > r]
            groups += [[u] * share[u] for u in flooders[r::rounds]]
            random.Random(r).shuffle(groups)
            order += [u for group in groups for u in group]
        return order

    def bursts(self) -> list[list[tuple[int, int]]]:
        """(command index, user) pairs, ``burst_size`` at a time."""
        sends = list(enumerate(self.plan()))
        return [sends[i:i + self.burst_size] for i in range(0, len(sends), self.burst_size)]

    @staticmethod
    def is_flooder(user: int) -> bool:
        return (user // 2) % 2 == 1  # both platforms have steady users and flooders

    @staticmethod
    def platform_of(user: int) -> str:
        return "discord" if user % 2 == 0 else "telegram"


@dataclass
class RunResult:
    scenario: Scenario
    counts: Counts
    problems: list[str]
    rss: list[tuple[str, int]]  # (label, KiB)
    at_kill: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def write_config(s: Scenario, workdir: Path, tg: FakeTelegramServer) -> None:
    settings = {
        "engine": {"backend": "dry-run", "database": str(workdir / "bot.sqlite3"),
                   "output_dir": str(workdir / "outputs"), "dry_run_step_s": s.step_s,
                   "max_queue_total": s.max_queue_total,
                   "max_queue_per_user": s.max_queue_per_user, "shutdown_grace_s": 10.0},
        "rate_limit": {"images_per_window": s.images_per_window, "window_s": s.window_s},
        "discord": {"token": "fake-discord-token"},
        "telegram": {"token": TG_TOKEN, "base_url": tg.base_url,
                     "base_file_url": tg.base_file_url},
        "delivery": {"attempts": 5, "first_delay_s": 0.5},
        "console": {"enabled": "never"},
    }
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        # JSON strings and numbers are valid TOML values.
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    (workdir / "load.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


class LoadRun:
    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        self.s = scenario
        self.workdir = workdir
        self.discord = FakeDiscord()
        self.tg = FakeTelegramServer()
        self.commands: list[Command] = []
        self.lives: list[BotProcess] = []
        self.rss: list[tuple[str, int]] = []
        self.at_kill: dict[str, int] = {}

    async def run(self) -> RunResult:
        started = time.monotonic()
        await self.discord.start()
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self.discord.close)
            await stack.enter_async_context(self.tg)
            write_config(self.s, self.workdir, self.tg)
            stack.push_async_callback(self._stop_bot)
            await self._start_life()
            bursts = self.s.bursts()
            for number, burst in enumerate(bursts, start=1):
                await self._send(burst)
                await asyncio.sleep(self.s.burst_gap_s)
                if self.s.restart and number == len(bursts) // 2:
                    await self._kill_and_restart()
            await self._settle()
            rss, peak = self.lives[-1].memory_kib()
            self.rss += [(f"after (life {len(self.lives)})", rss),
                         (f"peak (life {len(self.lives)})", peak)]
            counts = self._count()
            self._dump()
        return RunResult(self.s, counts, report.problems(counts), self.rss, self.at_kill,
                         time.monotonic() - started)

    async def _start_life(self) -> None:
        life = len(self.lives) + 1
        bot = BotProcess(self.workdir / "load.toml", self.discord.api_base,
                         self.discord.gateway_url, self.workdir / f"bot-life{life}.log")
        self.lives.append(bot)

        def ready() -> bool:  # Discord identified in this life; Telegram (started next) polls
            identified = sum(1 for f in self.discord.gateway_log if f.get("op") == 2)
            return identified >= life and any(t > bot.started_at for t in self.tg.polls)

        await bot.start(ready)
        self.rss.append((f"before (life {life})", bot.memory_kib()[0]))

    async def _stop_bot(self) -> None:
        if self.lives:
            await self.lives[-1].stop()

    async def _kill_and_restart(self) -> None:
        bot = self.lives[-1]
        rss, peak = bot.memory_kib()
        life = len(self.lives)
        self.rss += [(f"at SIGKILL (life {life})", rss), (f"peak (life {life})", peak)]
        if self.s.kill_on_upload:
            await self._next_upload()
        await bot.kill()
        journal = await asyncio.to_thread(report.read_journal, str(self.workdir / "bot.sqlite3"))
        self.at_kill = dict(Counter(
            "delivered" if r.delivered else f"{r.status}, not delivered" for r in journal))
        # An image the platform has but the journal does not know was delivered: it will be
        # sent again after the restart (delivery is at least once).
        marked = {r.job_id for r in journal if r.delivered}
        unmarked = {u.job_id: u.platform for u in self._uploads() if u.job_id not in marked}
        for name in ("discord", "telegram"):
            self.at_kill[f"uploaded to {name}, not marked"] = sum(
                1 for p in unmarked.values() if p == name)
        await self._start_life()

    async def _next_upload(self) -> None:
        seen = (len(self.discord.calls), len(self.tg.calls))
        while True:
            await asyncio.sleep(0)
            if any(c.files and c.status == 200 for c in self.discord.calls[seen[0]:]) or any(
                    c.method == "sendPhoto" and c.status == 200 for c in self.tg.calls[seen[1]:]):
                return

    async def _send(self, burst: list[tuple[int, int]]) -> None:
        for index, user in burst:
            text = f"load {index} --seed {index} --steps {self.s.steps} --size {self.s.size}"
            if self.s.platform_of(user) == "discord":
                who = FakeUser(str(DISCORD_USER_BASE + user), f"load{user}")
                sent = await self.discord.slash("imagine", who, prompt=text)
                self.commands.append(Command(index, user, "discord", sent.id, sent.at,
                                             token=sent.token, start_at=sent.at))
            else:
                uid = TG_USER_BASE + user
                message = self.tg.message(f"/imagine {text}", chat_id=uid, user_id=uid,
                                          first_name=f"load{user}")
                key = f"{uid}:{message['message_id']}"
                self.commands.append(Command(index, user, "telegram", key, time.monotonic(),
                                             update_id=self.tg.update_of[(uid, message['message_id'])]))

    async def _settle(self) -> None:
        """Wait until every journaled job is delivered and every command answered (or no more
        answers come for 10 s: a command in flight at a SIGKILL may never be)."""
        deadline = time.monotonic() + self.s.settle_timeout_s
        last, stable_since = (-1, -1), time.monotonic()
        while time.monotonic() < deadline:
            journal = await asyncio.to_thread(report.read_journal,
                                              str(self.workdir / "bot.sqlite3"))
            self._collect(journal)
            answered = sum(1 for c in self.commands if c.outcome != "unanswered")
            waiting = sum(1 for r in journal if not r.delivered)
            if (answered, waiting) != last:
                last, stable_since = (answered, waiting), time.monotonic()
            if waiting == 0 and (answered == len(self.commands)
                                 or time.monotonic() - stable_since > 10):
                return
            await asyncio.sleep(0.5)
        print(f"warning: not settled after {self.s.settle_timeout_s:.0f} s", file=sys.stderr)

    def _collect(self, journal: list[report.JournalRow]) -> list[report.Upload]:
        """Read outcomes, acknowledgements and uploads from the fakes' records."""
        keys = {r.key for r in journal}
        by_token: dict[str, list[Any]] = {}
        for call in self.discord.calls:
            if call.token and call.status == 200:
                by_token.setdefault(call.token, []).append(call)
        replies: dict[str, list[Any]] = {}
        for call in self.tg.calls:
            reply = call.json("reply_parameters") if call.status == 200 else None
            if isinstance(reply, dict):
                replies.setdefault(f"{call.params['chat_id']}:{reply['message_id']}",
                                   []).append(call)
        for c in self.commands:
            if c.platform == "discord":
                calls = by_token.get(c.token, [])
                acks = [k.at for k in calls if k.name == "interaction_callback"]
                texts = [k.content or "" for k in calls]
            else:
                calls = replies.get(c.key, [])
                acks = [k.at for k in calls]
                texts = [k.params.get("text", "") for k in calls]
                served = self.tg.served.get(c.update_id, [])
                before = [t for t in served if not acks or t <= acks[0]]
                c.start_at = before[-1] if before else None
            c.ack_at = acks[0] if acks else None
            kinds = [k for k in map(report.classify, texts) if k]
            c.outcome = "accepted" if c.key in keys else (kinds[0] if kinds else "unanswered")
        return self._uploads()

    def _uploads(self) -> list[report.Upload]:
        uploads = [report.upload_of(f.filename, f.data, call.at, "discord")
                   for call in self.discord.calls if call.status == 200 for f in call.files]
        for call in self.tg.calls:
            if call.method in ("sendPhoto", "sendDocument") and call.status == 200:
                name = "photo" if call.method == "sendPhoto" else "document"
                f = call.upload(name)
                uploads.append(report.upload_of(f.filename, f.data, call.at, "telegram"))
        return uploads

    def _dump(self) -> None:
        """Every command's fate, for a closer look (``--workdir`` keeps it)."""
        rows = [{**vars(c), "life": sum(1 for b in self.lives if b.started_at <= c.sent_at)}
                for c in self.commands]
        (self.workdir / "commands.json").write_text(json.dumps(rows, indent=0))

    def _count(self) -> Counts:
        journal = report.read_journal(str(self.workdir / "bot.sqlite3"))
        uploads = self._collect(journal)
        full = sorted(c.sent_at for c in self.commands if c.outcome == "total_cap")
        window = (full[0], full[-1]) if full else None
        return report.count(self.commands, journal, uploads, limit=self.s.images_per_window,
                            lives=[b.started_at for b in self.lives], full_window=window)


async def run_load(scenario: Scenario, workdir: Path | None = None) -> RunResult:
    """One run in ``workdir`` (a temporary folder, removed afterwards, if none is given)."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return await LoadRun(scenario, workdir).run()
    folder = Path(tempfile.mkdtemp(prefix="load-test-"))
    try:
        return await LoadRun(scenario, folder).run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor() or "?")
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU, Python {platform.python_version()}"


def describe(result: RunResult, title: str) -> str:
    s = result.scenario
    lines = [f"### {title}", "",
             f"{s.users} users, {s.commands} commands in bursts of {s.burst_size} every "
             f"{s.burst_gap_s:g} s; images_per_window={s.images_per_window} "
             f"(window {s.window_s:g} s), max_queue_per_user={s.max_queue_per_user}, "
             f"max_queue_total={s.max_queue_total}; dry run {s.steps} steps × {s.step_s:g} s, "
             f"{s.size}. Took {result.seconds:.0f} s.", ""]
    if result.at_kill:
        state = ", ".join(f"{v} {k}" for k, v in sorted(result.at_kill.items()))
        lines += [f"Journal at the SIGKILL: {state}.", ""]
        if any(v for k, v in result.at_kill.items() if k.startswith("uploaded")):
            lines += ["Uploaded but not yet marked delivered when the bot died: those are sent "
                      "again by the restarted bot (delivery is at least once).", ""]
    lines += [report.table(result.counts, result.rss, s.images_per_window), ""]
    lines.append("Result: " + ("PASS" if not result.problems else
                               "FAIL: " + "; ".join(result.problems)))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Scenario]:
    d = Scenario()
    p = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__)
    p.add_argument("--run", choices=["plain", "restart", "both"], default="both")
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--commands", type=int, default=d.commands)
    p.add_argument("--burst-size", type=int, default=d.burst_size)
    p.add_argument("--burst-gap", type=float, default=d.burst_gap_s)
    p.add_argument("--images-per-window", type=int, default=d.images_per_window)
    p.add_argument("--max-queue-per-user", type=int, default=d.max_queue_per_user)
    p.add_argument("--max-queue-total", type=int, default=d.max_queue_total)
    p.add_argument("--step-s", type=float, default=d.step_s)
    p.add_argument("--kill-on-upload", action="store_true",
                   help="restart run: SIGKILL right after a fake took an upload")
    p.add_argument("--workdir", type=Path, help="keep the database, outputs and bot logs here")
    a = p.parse_args(argv)
    return a, Scenario(users=a.users, commands=a.commands, burst_size=a.burst_size,
                       burst_gap_s=a.burst_gap, images_per_window=a.images_per_window,
                       max_queue_per_user=a.max_queue_per_user,
                       max_queue_total=a.max_queue_total, step_s=a.step_s,
                       kill_on_upload=a.kill_on_upload)


def main(argv: list[str] | None = None) -> int:
    args, scenario = parse_args(argv)
    print(f"python -m bench.load_test {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {machine()}\n")
    runs = {"plain": [False], "restart": [True], "both": [False, True]}[args.run]
    failed = False
    for restart in runs:
        title = "Run 2: SIGKILL halfway, restart" if restart else "Run 1: one bot life"
        workdir = args.workdir / ("restart" if restart else "plain") if args.workdir else None
        result = asyncio.run(run_load(replace(scenario, restart=restart), workdir))
        print(describe(result, title) + "\n", flush=True)
        failed |= bool(result.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
