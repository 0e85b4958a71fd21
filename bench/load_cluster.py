"""The load test's cluster (``Scenario.workers``, ``--cluster N``): a nats-server with JetStream on
loopback and N GPU workers, each the real ``python -m bot worker`` on the dry-run backend, whose
GPU time is simulated by ``dry_run_step_s`` per step. The bot under test gets the same [cluster]
section. The processes are the cluster tests' (``tests/cluster_fixtures.py``).

What it counts beside the bot's journal and the platforms' uploads: which worker ran each job
to its end (each worker's log), jobs run to the end twice (must be 0: a job moved from a killed
worker runs again only if its outcome was never stored), jobs the bot moved away from a
worker that left (the bot's log), and the objects left in the images bucket once the bot has
shut down (must be 0 unless the bot was SIGKILLed: it deletes every job's PNGs it journalled).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench import load_report as report
from engine.config import Config
from tests.cluster_fixtures import NatsServer, Workers, nats_server_binary

# Faster than the defaults (5 s, 20 s, 30 s) so that a killed worker's job moves within the run;
# the same mechanism either way (docs/reliability.md says what the run used).
HEARTBEAT_S, WORKER_TTL_S, ACK_WAIT_S = 1.0, 5.0, 10.0
READY_TIMEOUT_S = 60.0
MOVED = re.compile(r"job (\w+): worker \S+ left; the job goes to")
# While a job waits in the bot's queue, every worker has one (they all run any job here): the
# cluster's own rate, not the arrivals'.
BUSY = "every worker busy (1+ waiting)"


@dataclass
class ClusterCounts:
    workers: int
    runs: Counter[str] = field(default_factory=Counter)  # worker -> jobs it ran to the end
    ran_twice: int = 0  # jobs run to the end on two workers (or twice on one)
    moved: int = 0  # jobs the bot handed to another worker after theirs left
    killed: list[str] = field(default_factory=list)  # workers SIGKILLed during the run
    jobs_per_s_busy: float | None = None  # finished per second while every worker was busy
    objects_left: int | None = None  # in the images bucket after the bot's last shutdown
    bot_killed: bool = False  # SIGKILLed at least once: what it took then stays for the TTL


class LoadCluster:
    def __init__(self, workdir: Path, workers: int, step_s: float) -> None:
        self.workdir, self.count = workdir, workers
        self.server = NatsServer(_binary(), workdir / "jetstream")
        self.config = Config()
        self.config.engine.dry_run_step_s = step_s
        self.config.engine.database = str(workdir / "workers" / "bot.sqlite3")
        self.workers = Workers(self.config, workdir / "workers")
        self.names: list[str] = []  # every worker started, in order
        self.killed: list[str] = []

    def settings(self) -> dict[str, object]:
        """The bot's [cluster] section (the workers' is written from the same values)."""
        c = self.config.cluster
        return {"url": c.url, "name": c.name, "heartbeat_s": c.heartbeat_s,
                "worker_ttl_s": c.worker_ttl_s, "ack_wait_s": c.ack_wait_s,
                "max_deliver": c.max_deliver}

    async def start(self) -> None:
        (self.workdir / "workers").mkdir(parents=True, exist_ok=True)
        self.server.start()
        c = self.config.cluster
        c.url, c.name = self.server.url, "load"
        c.heartbeat_s, c.worker_ttl_s, c.ack_wait_s = HEARTBEAT_S, WORKER_TTL_S, ACK_WAIT_S
        for _ in range(self.count):
            self._start_one()
        await self._ready(self.names)

    def _start_one(self) -> str:
        name = f"w{len(self.names) + 1}"
        self.workers.start(name)
        self.names.append(name)
        return name

    async def _ready(self, names: list[str]) -> None:
        """Each worker pulls jobs and beats (its log says so)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        for name in names:
            while f"worker {name} ready" not in self.workers.log(name):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name} did not start; see {self.workdir}")
                await asyncio.sleep(0.1)

    async def kill_one(self) -> None:
        """SIGKILL the first worker still running (mid-job: the queue is deep). The last one
        left gets a fresh worker in its place, as its host's service manager would start."""
        victim = next(name for name in self.names if name in self.workers.processes)
        self.workers.kill(victim)
        self.killed.append(victim)
        if not self.workers.processes:
            await self._ready([self._start_one()])

    async def objects_left(self) -> int:
        """PNGs and input pictures still in the images bucket (deleted ones not counted)."""
        import nats
        from nats.js.errors import NotFoundError

        from engine.cluster.names import Names

        nc = await nats.connect(self.server.url)
        try:
            bucket = await nc.jetstream().object_store(Names(self.config.cluster.name)
                                                       .images_bucket)
            try:
                return len(await bucket.list(ignore_deletes=True))
            except NotFoundError:  # none at all
                return 0
        finally:
            await nc.close()

    def stop(self) -> None:
        self.workers.stop_all()
        self.server.kill()

    def count_runs(self, bot_logs: list[Path], journal: list[report.JournalRow]
                   ) -> ClusterCounts:
        counts = ClusterCounts(self.count, killed=list(self.killed),
                               jobs_per_s_busy=report.throughput_by_depth(
                                   journal, {BUSY: (1, 10**9)}).get(BUSY))
        times: Counter[str] = Counter()
        for name in self.names:
            finished = self.workers.finished(name)
            counts.runs[name] = len(finished)
            times.update(finished)
        counts.ran_twice = sum(1 for n in times.values() if n > 1)
        counts.moved = len({job for log in bot_logs if log.exists()
                            for job in MOVED.findall(log.read_text(errors="replace"))})
        return counts


def _binary() -> str:
    try:
        return nats_server_binary()
    except pytest.skip.Exception as missing:  # the test helper's "skip": here, a plain error
        raise SystemExit(str(missing)) from None


def table(c: ClusterCounts) -> str:
    runs = ", ".join(f"{name}: {n}" for name, n in sorted(c.runs.items()))
    rows = [("GPU workers (dry run)", f"{c.workers}"),
            ("jobs run per worker", runs),
            ("SIGKILLed workers", ", ".join(c.killed) or "none"),
            ("jobs moved from a worker that left", f"{c.moved}"),
            ("jobs run to the end twice", f"{c.ran_twice}"),
            (f"throughput, {BUSY}", "too few finishes" if c.jobs_per_s_busy is None
             else f"{c.jobs_per_s_busy:.2f} jobs/s"),
            ("objects left in the images bucket after the bot's shutdown",
             "?" if c.objects_left is None else f"{c.objects_left}"
             + (" (the bot was SIGKILLed: the TTL ends them)" if c.bot_killed else ""))]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"| {'cluster':<{width}} | value |", f"|{'-' * (width + 2)}|-------|",
                      *(f"| {k:<{width}} | {v} |" for k, v in rows)])


def problems(c: ClusterCounts) -> list[str]:
    found = [f"{c.ran_twice} jobs run to the end twice"] if c.ran_twice else []
    if c.objects_left and not c.bot_killed:
        found.append(f"{c.objects_left} objects left in the images bucket")
    return found
