"""Counting a load run: what happened to each command, from the fakes' records and the journal.

Each command the load test sent ends in one of: accepted (a journal row whose origin is that
command), refused by the rate limit, by the per-user queue cap or by the total queue cap (the
refusal text the bot sent back to that command), or unanswered. Uploads are counted per job id
from the file names the adapters give them (``<job id>-<seed>.png``), across every life of the
bot; the PNG's own parameters must name the journal's seed, so a wrong image is caught too.

The rate limit is exact, whatever the timing: the engine checks the queue caps first and a job
is charged when accepted (the window outlasts the run and nothing is refunded), so each user's
commands that got past the caps are accepted until the limit and refused after it:
``rate_limited_u = max(0, sent_u - queue_refused_u - limit)`` and
``accepted_u = min(limit, sent_u - queue_refused_u)``, summed over users.
"""

from __future__ import annotations

import bisect
import json
import math
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from engine.png import read_parameters

# The engine's refusal sentences (engine/rate_limit.py, engine/engine.py), one phrase each.
REFUSALS = {
    "rate_limit": "You have used your",
    "user_cap": "waiting (the most is",
    "total_cap": "The queue is full right now",
}
OUTCOMES = ("accepted", *REFUSALS, "other", "unanswered")


@dataclass
class Command:
    """One /imagine the load test sent."""

    index: int
    user: int  # user number, 0..users-1
    platform: str  # "discord" | "telegram"
    key: str  # discord: interaction id; telegram: "<chat id>:<message id>"
    sent_at: float  # time.monotonic(): dispatched (Discord), pushed (Telegram)
    token: str = ""  # discord interaction token
    update_id: int = 0  # telegram update
    outcome: str = "unanswered"
    start_at: float | None = None  # when the bot could first see it (Telegram: served)
    ack_at: float | None = None
    group: bool = False  # sent into the flooding Telegram group (``Scenario.group_users``)


@dataclass
class Upload:
    job_id: str
    at: float
    seed: str  # from the PNG's parameters
    platform: str = ""


@dataclass(frozen=True)
class JournalRow:
    job_id: str
    platform: str
    user_id: str
    key: str  # the command it came from (see ``Command.key``)
    seed: int
    status: str
    delivered: bool
    created_at: float = 0.0  # the bot's wall clock
    started_at: float | None = None
    finished_at: float | None = None


@dataclass
class Latency:
    count: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan


@dataclass
class Counts:
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    expected_rate_limited: int = 0
    expected_accepted: int = 0
    pattern_only_rate_limited: int = 0  # what the pattern alone gives with no queue refusals
    users_over_limit: int = 0
    jobs: int = 0  # journal rows (more than accepted commands if a command was queued twice)
    completed: int = 0
    delivered_once: int = 0
    lost: int = 0  # jobs that ended (finished or failed) with no upload
    still_waiting: int = 0  # queued or running when the run ended: not lost, not completed
    delivered_twice: int = 0
    wrong_image: int = 0
    unmarked: int = 0  # uploaded but the journal has no delivered mark
    uploads_by_life: Counter[int] = field(default_factory=Counter)
    ack: dict[str, Latency] = field(default_factory=dict)
    ack_full: dict[str, Latency] = field(default_factory=dict)
    cancelled: int = 0
    delivered_after_cancel: int = 0  # a cancelled job whose image was posted (re-run)
    twice_allowed: int = 0  # uploaded but not marked when a SIGKILL hit: may come again
    group_sent: int = 0
    group_accepted: int = 0
    group_refusals_dropped: int = 0  # the flooding group's refusals the outbox let go
    throughput: dict[str, float] = field(default_factory=dict)  # queue depth band -> jobs/s


def read_journal(path: str) -> list[JournalRow]:
    """The job journal, read-only (the bot may still be writing it)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT job_id, platform, user_id, origin_json, request_json, status,"
                          " delivered_at, created_at, started_at, finished_at FROM jobs"
                          " ORDER BY seq").fetchall()
    finally:
        db.close()
    journal = []
    for (job_id, platform, user_id, origin_json, request_json, status, delivered_at,
         created_at, started_at, finished_at) in rows:
        origin = json.loads(origin_json)
        key = origin["message_id"] if platform == "discord" else (
            f"{origin['chat_id']}:{origin['message_id']}")
        journal.append(JournalRow(job_id, platform, user_id, key, json.loads(request_json)["seed"],
                                  status, delivered_at is not None, created_at, started_at,
                                  finished_at))
    return journal


def upload_of(filename: str, data: bytes, at: float, platform: str) -> Upload:
    return Upload(filename.split("-", 1)[0], at, read_parameters(data).get("Seed", ""), platform)


def classify(text: str) -> str | None:
    for outcome, phrase in REFUSALS.items():
        if phrase in text:
            return outcome
    return "other" if text.startswith("⚠️") else None


def percentiles(values: list[float]) -> Latency:
    """Nearest-rank p50/p99 in milliseconds."""
    if not values:
        return Latency()
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000

    return Latency(len(ordered), rank(0.50), rank(0.99), ordered[-1] * 1000)


def count(commands: list[Command], journal: list[JournalRow], uploads: list[Upload], *,
          limit: int, lives: list[float], full_window: tuple[float, float] | None,
          twice_allowed: int = 0) -> Counts:
    """Tally a run. ``lives``: when each bot life started (an upload belongs to the last one
    started before it); ``full_window``: when the queue was full (for the latency split);
    ``twice_allowed``: uploads not yet marked delivered when a SIGKILL hit (sent again after
    the restart: delivery is at least once across a SIGKILL, docs/reliability.md)."""
    c = Counts(sent=len(commands), jobs=len(journal), twice_allowed=twice_allowed)
    rows_by_key: dict[str, list[JournalRow]] = defaultdict(list)
    for row in journal:
        rows_by_key[row.key].append(row)
    for command in commands:
        if rows_by_key.get(command.key):
            command.outcome = "accepted"
        if command.group:  # a flood's refusals may be dropped by design: counted apart
            c.group_sent += 1
            c.group_accepted += command.outcome == "accepted"
            c.group_refusals_dropped += command.outcome == "unanswered"
            c.outcomes["accepted"] += command.outcome == "accepted"
            continue
        c.outcomes[command.outcome] += 1
    _expected(c, [m for m in commands if not m.group], limit)
    c.expected_accepted += c.group_accepted
    c.users_over_limit += sum(n > limit for n in Counter(
        m.user for m in commands if m.group and m.outcome == "accepted").values())
    _deliveries(c, journal, uploads, lives)
    c.throughput = throughput_by_depth(journal)
    for platform in ("discord", "telegram"):
        mine = [m for m in commands if m.platform == platform and not m.group]
        c.ack[platform] = percentiles(_waits(mine))
        if full_window is not None:
            during = [m for m in mine if full_window[0] <= m.sent_at <= full_window[1]]
            c.ack_full[platform] = percentiles(_waits(during))
    return c


# Queue depth bands for the throughput comparison: a short queue (the next job is always ready,
# so the GPU never waits) against a long one (issue 11: at 1,000 queued, at least 90 %).
DEPTH_BANDS = {"1-20 queued": (1, 20), "1000+ queued": (1000, 10**9)}


def throughput_by_depth(journal: list[JournalRow],
                        bands: dict[str, tuple[int, int]] = DEPTH_BANDS) -> dict[str, float]:
    """Jobs finished per second while the queue held a given number of waiting jobs.

    Each finish is credited with the time since the previous finish, in the band of the
    queue's depth at that moment (jobs created and not yet started). Bands with fewer than 20
    finishes are left out (too few to say anything)."""
    done = sorted(r.finished_at for r in journal if r.status == "finished" and r.finished_at)
    created = sorted(r.created_at for r in journal)
    started = sorted(r.started_at if r.started_at is not None else math.inf for r in journal)
    result = {}
    for name, (low, high) in bands.items():
        n, seconds = 0, 0.0
        for before, at in zip(done, done[1:], strict=False):
            depth = bisect.bisect_right(created, at) - bisect.bisect_right(started, at)
            if low <= depth <= high:
                n, seconds = n + 1, seconds + (at - before)
        if n >= 20 and seconds > 0:
            result[name] = n / seconds
    return result


def _waits(commands: list[Command]) -> list[float]:
    return [m.ack_at - m.start_at for m in commands
            if m.ack_at is not None and m.start_at is not None]


def _expected(c: Counts, commands: list[Command], limit: int) -> None:
    by_user: dict[int, Counter[str]] = defaultdict(Counter)
    for command in commands:
        by_user[command.user][command.outcome] += 1
    for outcomes in by_user.values():
        answered = sum(outcomes.values()) - outcomes["unanswered"]
        passed = answered - outcomes["user_cap"] - outcomes["total_cap"]
        c.expected_rate_limited += max(0, passed - limit)
        c.expected_accepted += min(limit, passed)
        c.pattern_only_rate_limited += max(0, sum(outcomes.values()) - limit)
        c.users_over_limit += outcomes["accepted"] > limit


def _deliveries(c: Counts, journal: list[JournalRow], uploads: list[Upload],
                lives: list[float]) -> None:
    per_job: dict[str, list[Upload]] = defaultdict(list)
    for upload in uploads:
        per_job[upload.job_id].append(upload)
        c.uploads_by_life[sum(1 for start in lives if start <= upload.at)] += 1
    for row in journal:
        mine = per_job.get(row.job_id, [])
        c.completed += row.status == "finished"
        if row.status in ("queued", "running"):
            c.still_waiting += 1  # the journal still has it: it runs after the next start
            continue
        if row.status == "cancelled":
            c.cancelled += 1
            c.delivered_after_cancel += bool(mine)
            continue
        c.lost += not mine
        c.delivered_once += len(mine) == 1
        c.delivered_twice += len(mine) > 1
        c.wrong_image += any(u.seed != str(row.seed) for u in mine)
        c.unmarked += bool(mine) and not row.delivered


def table(c: Counts, rss: list[tuple[str, int]], limit: int) -> str:
    """The run's results as a Markdown table (also readable in a terminal)."""
    o = c.outcomes
    rows = [
        ("commands sent", f"{c.sent}"),
        ("accepted (journaled)", f"{o['accepted']} (expected {c.expected_accepted})"),
        ("refused by rate limit", f"{o['rate_limit']} (expected {c.expected_rate_limited} = "
                                  f"Σ max(0, sent − queue-refused − {limit}))"),
        ("refused by per-user queue cap", f"{o['user_cap']}"),
        ("refused by total queue cap", f"{o['total_cap']}"),
        ("other answers / unanswered", f"{o['other']} / {o['unanswered']}"),
        ("cancelled / of them posted anyway", f"{c.cancelled} / {c.delivered_after_cancel}"),
        ("users with more than the limit accepted", f"{c.users_over_limit}"),
        ("jobs in journal / completed", f"{c.jobs} / {c.completed}"),
        ("delivered exactly once", f"{c.delivered_once}"),
        ("lost (ended, no upload)", f"{c.lost}"),
        ("still queued at the end", f"{c.still_waiting}"),
        ("delivered twice or more", f"{c.delivered_twice} (SIGKILL window: at most "
                                    f"{c.twice_allowed})"),
        ("wrong image / uploaded but not marked delivered", f"{c.wrong_image} / {c.unmarked}"),
    ]
    if c.group_sent:
        rows.append(("flooding group: sent / accepted / refusals dropped",
                     f"{c.group_sent} / {c.group_accepted} / {c.group_refusals_dropped}"))
    for band, rate in c.throughput.items():
        rows.append((f"throughput, {band}", f"{rate:.1f} jobs/s"))
    if len(c.uploads_by_life) > 1:
        lives = ", ".join(f"life {k}: {v}" for k, v in sorted(c.uploads_by_life.items()))
        rows.append(("uploads per bot life", lives))
    for platform, lat in c.ack.items():
        rows.append((f"{platform} ack p50 / p99 / max (n)", _lat(lat)))
        full = c.ack_full.get(platform)
        if full is not None:
            rows.append((f"{platform} ack while queue full: p50 / p99 / max (n)", _lat(full)))
    rows += [(f"bot RSS {label}", f"{kib / 1024:.0f} MiB") for label, kib in rss]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _lat(lat: Latency) -> str:
    return f"{lat.p50_ms:.0f} / {lat.p99_ms:.0f} / {lat.max_ms:.0f} ms ({lat.count})"


def problems(c: Counts) -> list[str]:
    """What must hold for the run to pass (an empty list = it passed)."""
    o = c.outcomes
    found = []
    if o["rate_limit"] != c.expected_rate_limited:
        found.append(f"rate-limit refusals {o['rate_limit']} != expected "
                     f"{c.expected_rate_limited}")
    if o["accepted"] != c.expected_accepted:
        found.append(f"accepted {o['accepted']} != expected {c.expected_accepted}")
    checks: list[tuple[int, str]] = [
        (c.users_over_limit, "users got more than the limit"), (o["other"], "other answers"),
        (o["unanswered"], "commands unanswered"),
        (c.lost, "accepted jobs lost"),
        (c.jobs - c.completed - c.cancelled, "jobs not completed"),
        (max(0, c.delivered_twice - c.twice_allowed),
         "jobs delivered twice (outside the SIGKILL window)"),
        (c.delivered_after_cancel, "cancelled jobs posted anyway"),
        (c.wrong_image, "wrong images"),
        (c.unmarked, "uploads without a journal mark"), (c.jobs - o["accepted"],
                                                          "commands queued twice")]
    found += [f"{n} {what}" for n, what in checks if n]
    short, long = (c.throughput.get(band) for band in DEPTH_BANDS)
    if short and long and long < 0.9 * short:
        found.append(f"throughput at 1,000+ queued {long:.1f} jobs/s < 90% of a short "
                     f"queue's {short:.1f}")
    return found


__all__ = ["Command", "Counts", "JournalRow", "OUTCOMES", "Upload", "classify", "count",
           "percentiles", "problems", "read_journal", "table", "upload_of"]
