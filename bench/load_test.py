"""Load test: many users send /imagine in bursts to Discord and Telegram at once; nothing is lost.

    .venv/bin/python -m bench.load_test                      # plain and restart, 1,000 commands each
    .venv/bin/python -m bench.load_test --scenario all       # every fault below, ~15 minutes
    .venv/bin/python -m bench.load_test --scenario outage --users 20 --commands 100
    .venv/bin/python -m bench.load_test --scenario cluster worker-kill --cluster 1 4

The bot runs as its own process (``bench.load_bot_launcher``: the real ``python -m bot run`` on the
dry-run backend) against the fake Discord and Telegram servers of ``tests/fakes``, which run here
and record every call. Even users are on Discord (one guild channel), odd users on Telegram
(private chats); ``Scenario.plan`` says who sends when; commands go out ``burst_size`` at a time,
``burst_gap_s`` apart. ``SCENARIOS`` names the runs: "restart" SIGKILLs the bot after half
the bursts and starts it again on the same database before sending the rest; others kill it
twice, during its recovery, 0.2 s after a burst, SIGTERM it with a full queue or uploads in
flight, take the platforms' uploads down for 60 s, answer uploads after the client's timeout,
flood one Telegram group, or fill a 2,000-job queue. ``bench.load_report`` counts the outcome.

With ``Scenario.workers`` (``--cluster N``) the bot hands its jobs to N GPU worker processes
(``python -m bot worker``, dry run, each step's GPU time simulated) through a real nats-server
(``bench.load_cluster``); "worker-kill" SIGKILLs one of them halfway. Several counts
(``--cluster 1 4``) run each scenario once per count and compare their throughput.

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
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import load_cluster as cluster  # noqa: E402
from bench import load_report as report  # noqa: E402
from bench.load_bot_launcher import BotProcess  # noqa: E402
from bench.load_cluster import ClusterCounts, LoadCluster  # noqa: E402
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
    # What else happens, as (after this fraction of the bursts, action); the actions are
    # ``LoadRun.ACTIONS``' keys. ``restart`` above is (0.5, "kill").
    events: tuple[tuple[float, str], ...] = ()
    outage_s: float = 60.0  # "outage": uploads answered 503 for this long
    slow_answer_s: float = 4.0  # "slow": Telegram takes a photo, answers this late
    slow_uploads: int = 20  # ... for this many photos
    read_timeout_s: float = 20.0  # the bot's telegram.read_timeout_s
    cancels: int = 0  # Telegram users who send /cancel for their latest job after "cancel"
    # One Telegram group floods this many commands (from ``group_users`` members) at the start.
    group_commands: int = 0
    group_users: int = 5
    delivery_max_delay_s: float = 5.0  # [delivery] max_delay_s: background retries' period
    # 0: the bot runs the dry-run backend itself; N: N dry-run GPU workers through NATS, whose
    # step_s is the simulated GPU time ("kill-worker" SIGKILLs one of them)
    workers: int = 0

    def schedule(self, bursts: int) -> dict[int, list[str]]:
        """Burst number (1-based) -> actions to take right after sending it."""
        events = list(self.events)
        if self.restart:
            events.append((0.5, "kill-on-upload" if self.kill_on_upload else "kill"))
        plan: dict[int, list[str]] = {}
        for fraction, action in events:
            plan.setdefault(max(1, min(bursts, round(fraction * bursts))), []).append(action)
        return plan

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
    cluster: ClusterCounts | None = None
    cpu_s: float = 0.0  # CPU time of every process of the run: the bot, the fakes, NATS, workers


def write_config(s: Scenario, workdir: Path, tg: FakeTelegramServer,
                 cluster_settings: dict[str, object] | None = None) -> None:

    settings = {
        "engine": {"backend": "dry-run", "database": str(workdir / "bot.sqlite3"),
                   "output_dir": str(workdir / "outputs"), "dry_run_step_s": s.step_s,
                   "max_queue_total": s.max_queue_total,
                   "max_queue_per_user": s.max_queue_per_user, "shutdown_grace_s": 10.0},
        "rate_limit": {"images_per_window": s.images_per_window, "window_s": s.window_s},
        "discord": {"token": "fake-discord-token"},
        "telegram": {"token": TG_TOKEN, "base_url": tg.base_url,
                     "base_file_url": tg.base_file_url, "read_timeout_s": s.read_timeout_s},
        "delivery": {"attempts": 5, "first_delay_s": 0.5, "max_delay_s": s.delivery_max_delay_s},
        "console": {"enabled": "never"},
    }
    if cluster_settings:
        settings["cluster"] = cluster_settings
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
        self.at_kill: Counter[str] = Counter()  # the journal at each SIGKILL/SIGTERM, summed
        self.twice_allowed = 0
        self.problems: list[str] = []
        self.cluster = LoadCluster(workdir, scenario.workers, scenario.step_s) \
            if scenario.workers else None

    async def run(self) -> RunResult:
        started, cpu_before = time.monotonic(), cpu_seconds()
        await self.discord.start()
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self.discord.close)
            await stack.enter_async_context(self.tg)
            if self.cluster is not None:
                stack.callback(self.cluster.stop)  # after the bot (the stack unwinds backwards)
                await self.cluster.start()
            write_config(self.s, self.workdir, self.tg,
                         self.cluster.settings() if self.cluster else None)
            stack.push_async_callback(self._stop_bot)
            await self._start_life()
            self._flood_group()
            bursts = self.s.bursts()
            schedule = self.s.schedule(len(bursts))
            for number, burst in enumerate(bursts, start=1):
                await self._send(burst)
                actions = schedule.get(number, [])
                for action in (a for a in actions if a in self.AT_ONCE):
                    await self.ACTIONS[action](self)
                await asyncio.sleep(self.s.burst_gap_s)  # the others: once it was answered
                for action in (a for a in actions if a not in self.AT_ONCE):
                    await self.ACTIONS[action](self)
            await self._settle()
            rss, peak = self.lives[-1].memory_kib()
            self.rss += [(f"after (life {len(self.lives)})", rss),
                         (f"peak (life {len(self.lives)})", peak)]
            counts = self._count()
            self._dump()
            workers = None
            if self.cluster is not None:
                journal = report.read_journal(str(self.workdir / "bot.sqlite3"))
                workers = self.cluster.count_runs([b.log for b in self.lives], journal)
                await self._stop_bot()  # its clean shutdown deletes what it took
                workers.objects_left = await self.cluster.objects_left()
                workers.bot_killed = any("SIGKILL" in key for key in self.at_kill)
                self.problems += cluster.problems(workers)
        return RunResult(self.s, counts, self.problems + report.problems(counts), self.rss,
                         dict(self.at_kill), time.monotonic() - started, workers,
                         cpu_seconds() - cpu_before)

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

    # -- what happens to the bot (``Scenario.events``) ---------------------------------------
    async def _kill(self) -> None:
        """SIGKILL, note what the journal had, start the next life."""
        bot = self.lives[-1]
        rss, peak = bot.memory_kib()
        life = len(self.lives)
        self.rss += [(f"at SIGKILL (life {life})", rss), (f"peak (life {life})", peak)]
        await bot.kill()
        await self._note_journal("SIGKILL")
        await self._start_life()

    async def _kill_on_upload(self) -> None:
        await self._next_upload()
        await self._kill()

    async def _kill_soon(self) -> None:
        """0.2 s after the burst: commands received, not all journalled yet."""
        await asyncio.sleep(0.2)
        await self._kill()

    async def _kill_in_recovery(self) -> None:
        """SIGKILL, start, and SIGKILL again 0.1 s after the new life is ready (while it is
        re-queueing and re-delivering what the first one left)."""
        await self._kill()
        await asyncio.sleep(0.1)
        await self._kill()

    async def _term(self) -> None:
        """SIGTERM (the clean shutdown), wait for the exit, start the next life."""
        bot = self.lives[-1]
        await self._note_journal("SIGTERM")
        code = await bot.stop(timeout=60)
        if code != 0:
            self.problems.append(f"the bot exited with {code} after SIGTERM")
        await self._start_life()

    async def _term_on_upload(self) -> None:
        await self._next_upload()
        await self._term()

    async def _outage(self) -> None:
        """Uploads fail with 503 on both platforms for ``outage_s`` (the run goes on)."""
        until = time.monotonic() + self.s.outage_s
        for method in ("sendPhoto", "sendDocument"):
            self.tg.outage(method, until)
        for route in ("edit_original", "followup", "channel_message"):
            self.discord.outage(route, until, when=lambda call: bool(call.files))

    async def _slow(self) -> None:
        """The next photos are taken by Telegram but answered after the client's timeout."""
        self.tg.slow_next("sendPhoto", self.s.slow_answer_s, times=self.s.slow_uploads)

    async def _kill_worker(self) -> None:
        """SIGKILL a GPU worker mid-job (its job moves to another once its heartbeat expires)."""
        assert self.cluster is not None, "kill-worker needs a cluster (--cluster N)"
        await self.cluster.kill_one()

    async def _cancel(self) -> None:
        """The first ``cancels`` Telegram users who have a job send /cancel (their latest)."""
        users = sorted({c.user for c in self.commands
                        if c.platform == "telegram" and not c.group})[:self.s.cancels]
        for user in users:
            uid = TG_USER_BASE + user
            self.tg.message("/cancel", chat_id=uid, user_id=uid, first_name=f"load{user}")

    ACTIONS = {"kill": _kill, "kill-on-upload": _kill_on_upload, "kill-soon": _kill_soon,
               "kill-in-recovery": _kill_in_recovery, "term": _term,
               "term-on-upload": _term_on_upload, "outage": _outage, "slow": _slow,
               "cancel": _cancel, "kill-worker": _kill_worker}
    AT_ONCE = {"kill-soon", "cancel"}  # right after the burst, not after the gap

    async def _note_journal(self, how: str) -> None:
        """The journal as the bot left it. An image the platform has but the journal does not
        know was delivered is sent again after a SIGKILL (delivery is at least once across a
        SIGKILL): those may come twice."""
        journal = await asyncio.to_thread(report.read_journal, str(self.workdir / "bot.sqlite3"))
        state = Counter(f"delivered (at {how})" if r.delivered else
                        f"{r.status}, not delivered (at {how})" for r in journal)
        marked = {r.job_id for r in journal if r.delivered}
        unmarked = {u.job_id: u.platform for u in self._uploads() if u.job_id not in marked}
        for name in ("discord", "telegram"):
            state[f"uploaded to {name}, not marked (at {how})"] = sum(
                1 for p in unmarked.values() if p == name)
        self.at_kill.update(state)
        if how == "SIGKILL":
            self.twice_allowed += len(unmarked)

    async def _next_upload(self, timeout: float = 30.0) -> None:
        """Return the moment a fake has taken an image (polled every millisecond)."""
        seen = (len(self.discord.calls), len(self.tg.calls))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(c.files and c.status == 200 for c in self.discord.calls[seen[0]:]) or any(
                    c.method == "sendPhoto" and c.status == 200 for c in self.tg.calls[seen[1]:]):
                return
            await asyncio.sleep(0.001)
        self.problems.append(f"no upload came within {timeout:.0f} s to aim the fault at")

    def _flood_group(self) -> None:
        """One Telegram group sends ``group_commands`` at once, its members taking turns."""
        chat = -(TG_USER_BASE + 999_999)
        for n in range(self.s.group_commands):
            member = 1_000_000 + n % self.s.group_users
            uid = TG_USER_BASE + member
            text = (f"/imagine group {n} --seed {n} --steps {self.s.steps} "
                    f"--size {self.s.size}")
            message = self.tg.message(text, chat_id=chat, user_id=uid, chat_type="group",
                                      first_name=f"member{member}")
            key = f"{chat}:{message['message_id']}"
            self.commands.append(Command(-1 - n, member, "telegram", key, time.monotonic(),
                                         update_id=self.tg.update_of[(chat, message['message_id'])],
                                         group=True))

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
            waiting = sum(1 for r in journal if not r.delivered and r.status != "cancelled")
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
        # A channel post Discord answered with the message its nonce already made is no
        # second message (``enforce_nonce``): each nonce counts once.
        nonces: set[str] = set()
        uploads = []
        for call in self.discord.calls:
            nonce = call.json.get("nonce") if isinstance(call.json, dict) else None
            if call.status != 200 or (nonce and call.name == "channel_message"
                                      and nonce in nonces):
                continue
            if nonce and call.name == "channel_message":
                nonces.add(nonce)
            uploads += [report.upload_of(f.filename, f.data, call.at, "discord")
                        for f in call.files]
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
                            lives=[b.started_at for b in self.lives], full_window=window,
                            twice_allowed=self.twice_allowed)


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


def cpu_seconds() -> float:
    """User and system time of this process and of its children that ended (the bot, the
    workers, the nats-server: each is waited for when it stops)."""
    own, children = (resource.getrusage(who) for who in
                     (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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
             f"{s.size}{_where(s)}. Took {result.seconds:.0f} s; {result.cpu_s:.0f} s of CPU "
             f"in all processes, start-ups included ({result.cpu_s / result.seconds:.2f} of "
             f"{os.cpu_count()} cores).", ""]
    if result.at_kill:
        state = ", ".join(f"{v} {k}" for k, v in sorted(result.at_kill.items()))
        lines += [f"Journal at the SIGKILL: {state}.", ""]
        if any(v for k, v in result.at_kill.items() if k.startswith("uploaded")):
            lines += ["Uploaded but not yet marked delivered when the bot died: those are sent "
                      "again by the restarted bot (delivery is at least once).", ""]
    lines += [report.table(result.counts, result.rss, s.images_per_window), ""]
    if result.cluster is not None:
        lines += [cluster.table(result.cluster), ""]
    lines.append("Result: " + ("PASS" if not result.problems else
                               "FAIL: " + "; ".join(result.problems)))
    return "\n".join(lines)


def _where(s: Scenario) -> str:
    if not s.workers:
        return ", on the bot's own (dry-run) GPU"
    return (f", on {s.workers} dry-run GPU worker{'s' * (s.workers > 1)} through NATS "
            f"({s.steps * s.step_s:g} s of simulated GPU time a job)")


def comparison(results: list[tuple[str, RunResult]]) -> str:
    """Each scenario's runs side by side, throughput against its run with the fewest workers."""
    lines = ["| scenario | workers | accepted | lost | delivered twice | run twice on workers | "
             "jobs moved | jobs/s, every worker busy | × fewest workers' |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(n for n, _ in results):
        runs = sorted((r for n, r in results if n == name and r.cluster is not None),
                      key=lambda r: r.scenario.workers)
        base = runs[0].cluster.jobs_per_s_busy if runs and runs[0].cluster else None
        for r in runs:
            w, c = r.cluster, r.counts
            assert w is not None
            rate = w.jobs_per_s_busy
            ratio = f"{rate / base:.2f}×" if rate and base else "?"
            lines.append(f"| {name} | {w.workers} | {c.outcomes['accepted']} | {c.lost} | "
                         f"{c.delivered_twice} | {w.ran_twice} | {w.moved} | "
                         f"{'?' if rate is None else f'{rate:.2f}'} | {ratio} |")
    return "\n".join(lines)


# The named runs (``--scenario``). Sizes are chosen so that each takes a minute or two here.
_KILLS = dict(users=100, commands=400, burst_size=40, burst_gap_s=1.0)
# A cluster's simulated GPU time per step: 4 steps make a job of 0.5 s, far above what the bot,
# the fakes, NATS and the workers spend per job on this machine's CPU (about 10 ms), so the
# workers are what is measured. A real card takes seconds (README: 3.6 s at 1024² on an H100).
CLUSTER_STEP_S = 0.125
SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "plain": ("one bot life", Scenario()),
    "restart": ("SIGKILL halfway, restart", Scenario(restart=True)),
    "kill-on-upload": ("SIGKILL the moment a platform took an upload",
                       Scenario(restart=True, kill_on_upload=True)),
    "kill-in-recovery": ("SIGKILL halfway, and again 0.1 s after the restart (in recovery)",
                         Scenario(**_KILLS, events=((0.5, "kill-in-recovery"),))),
    "two-kills": ("two SIGKILLs one burst apart",
                  Scenario(**_KILLS, events=((0.4, "kill"), (0.5, "kill")))),
    "kill-after-burst": ("SIGKILL 0.2 s after a burst (commands received, not all journalled)",
                         Scenario(**_KILLS, events=((0.5, "kill-soon"),))),
    "term-full-queue": ("SIGTERM with the queue full and cancels just before it",
                        Scenario(users=100, commands=400, burst_size=100, burst_gap_s=0.5,
                                 images_per_window=1000, max_queue_per_user=10,
                                 max_queue_total=100, step_s=0.05, cancels=10,
                                 events=((0.5, "cancel"), (0.5, "term")))),
    "term-uploads": ("SIGTERM the moment a platform took an upload (uploads in flight)",
                     Scenario(**_KILLS, events=((0.5, "term-on-upload"),))),
    "outage": ("uploads fail with 503 on both platforms for 60 s",
               Scenario(**_KILLS, events=((0.2, "outage"),))),
    "slow-uploads": ("20 photos answered 4 s late, after the client's 2 s timeout",
                     Scenario(**_KILLS, read_timeout_s=2.0, events=((0.2, "slow"),))),
    "group-flood": ("one Telegram group floods 300 commands while other chats are served",
                    Scenario(users=100, commands=300, burst_size=20, burst_gap_s=1.0,
                             group_commands=300, group_users=5)),
    "queue-2000": ("max_queue_total 2000 with 2,000 commands",
                   Scenario(users=400, commands=2000, burst_size=250, burst_gap_s=0.2,
                            images_per_window=5, max_queue_per_user=5, max_queue_total=2000,
                            step_s=0.005, settle_timeout_s=600)),
    "cluster": ("the 1,000 commands on GPU workers through NATS",
                Scenario(workers=4, step_s=CLUSTER_STEP_S)),
    "worker-kill": ("the 1,000 commands on GPU workers through NATS, one worker SIGKILLed "
                    "halfway", Scenario(workers=4, step_s=CLUSTER_STEP_S,
                                        events=((0.5, "kill-worker"),))),
}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Scenario]]:
    d = Scenario()
    p = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", nargs="+", default=["plain", "restart"],
                   choices=[*SCENARIOS, "all"], help="which runs (default: plain restart)")
    p.add_argument("--users", type=int, help=f"default {d.users} (or the scenario's)")
    p.add_argument("--commands", type=int)
    p.add_argument("--burst-size", type=int)
    p.add_argument("--burst-gap", type=float, dest="burst_gap_s")
    p.add_argument("--images-per-window", type=int)
    p.add_argument("--max-queue-per-user", type=int)
    p.add_argument("--max-queue-total", type=int)
    p.add_argument("--step-s", type=float)
    p.add_argument("--cluster", type=int, nargs="+", metavar="N",
                   help="run each scenario on N dry-run GPU workers through a nats-server, once "
                        "per N given (--cluster 1 4 compares them); default: the scenario's own "
                        "(0, the bot's own GPU, but 4 for cluster and worker-kill)")
    p.add_argument("--workdir", type=Path, help="keep the database, outputs and bot logs here")
    a = p.parse_args(argv)
    if a.cluster and min(a.cluster) < 1:
        p.error("--cluster counts workers: 1 or more")
    names = list(SCENARIOS) if "all" in a.scenario else a.scenario
    overrides = {k: v for k, v in vars(a).items()
                 if k not in ("scenario", "workdir", "cluster") and v is not None}
    return a, {name: replace(SCENARIOS[name][1], **overrides) for name in names}


def runs_of(name: str, scenario: Scenario, counts: list[int] | None, *, step_given: bool
            ) -> list[tuple[str, Scenario]]:
    """(title, scenario) once per worker count asked for (``--cluster``), else as named. A
    single-GPU scenario put on a cluster gets the cluster's simulated GPU time, unless
    ``--step-s`` said otherwise."""
    if not counts:
        return [(f"{name}: {SCENARIOS[name][0]}", scenario)]
    step_s = scenario.step_s if scenario.workers or step_given else CLUSTER_STEP_S
    return [(f"{name}: {SCENARIOS[name][0]} ({n} worker{'s' * (n > 1)})",
             replace(scenario, workers=n, step_s=step_s)) for n in counts]


def main(argv: list[str] | None = None) -> int:
    args, scenarios = parse_args(argv)
    print(f"python -m bench.load_test {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {machine()}\n")
    failed = False
    results: list[tuple[str, RunResult]] = []
    for name, named in scenarios.items():
        for title, scenario in runs_of(name, named, args.cluster,
                                       step_given=args.step_s is not None):
            folder = f"{name}-{scenario.workers}w" if args.cluster else name
            workdir = args.workdir / folder if args.workdir else None
            result = asyncio.run(run_load(scenario, workdir))
            print(describe(result, title) + "\n", flush=True)
            failed |= bool(result.problems)
            results.append((name, result))
    if args.cluster and len(args.cluster) > 1:
        print(comparison(results), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
