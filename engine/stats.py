"""Usage statistics for ``/stats``, read from the journal (no store of their own).

For each period (the last day, the last 7 days) of jobs *asked for* in it: images made, GPU
seconds (measured on the worker, ``jobs.gpu_s``: finished jobs), failures and their causes,
the median wait in the queue (asked → started) and the median GPU time per image, and the users
who made the most images. Rows older than ``engine.keep_outputs_days`` are pruned, so the week
is complete only when that is 7 days or more (the default is 30).
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass

from engine.store import Store

PERIODS = (("the last day", 86400.0), ("the last 7 days", 7 * 86400.0))
TOP_USERS = 5
TOP_CAUSES = 3
_JOB_ID = re.compile(r"\b[0-9a-f]{8}\b")  # job ids in error sentences: one cause, many jobs


@dataclass(frozen=True)
class UserUse:
    key: str  # "platform:user_id": only for private answers
    name: str  # the user's latest display name
    images: int
    gpu_s: float


@dataclass(frozen=True)
class PeriodStats:
    label: str
    images: int  # images made (finished jobs' images)
    jobs: int  # jobs asked for
    gpu_s: float
    failures: int
    wait_p50_s: float | None
    per_image_p50_s: float | None
    top_users: tuple[UserUse, ...]
    causes: tuple[tuple[str, int], ...]  # failure sentence (job ids blanked), count


@dataclass(frozen=True)
class UsageStats:
    periods: tuple[PeriodStats, ...]


@dataclass(frozen=True)
class _Row:
    key: str
    name: str
    status: str
    images: int
    gpu_s: float | None
    created_at: float
    started_at: float | None
    error: str | None


async def usage_stats(store: Store, now: float) -> UsageStats:
    longest = max(seconds for _, seconds in PERIODS)
    rows = await _rows_since(store, now - longest)
    return UsageStats(tuple(_period(label, [r for r in rows if r.created_at >= now - seconds])
                            for label, seconds in PERIODS))


async def _rows_since(store: Store, since: float) -> list[_Row]:
    async with store.db.execute(
        "SELECT platform, user_id, display_name, status, images, gpu_s, created_at, started_at,"
        " error FROM jobs WHERE created_at >= ? ORDER BY seq", (since,),
    ) as cursor:
        return [_Row(f"{r[0]}:{r[1]}", r[2], r[3], int(r[4]), r[5], float(r[6]), r[7], r[8])
                for r in await cursor.fetchall()]


def _period(label: str, rows: list[_Row]) -> PeriodStats:
    finished = [r for r in rows if r.status == "finished"]
    failed = [r for r in rows if r.status == "failed"]
    waits = [r.started_at - r.created_at for r in rows if r.started_at is not None]
    per_image = [r.gpu_s / r.images for r in finished if r.gpu_s is not None and r.images]
    causes = Counter(_JOB_ID.sub("…", r.error or "unknown") for r in failed)
    return PeriodStats(
        label=label,
        images=sum(r.images for r in finished),
        jobs=len(rows),
        gpu_s=sum(r.gpu_s or 0.0 for r in rows),
        failures=len(failed),
        wait_p50_s=statistics.median(waits) if waits else None,
        per_image_p50_s=statistics.median(per_image) if per_image else None,
        top_users=_top_users(finished),
        causes=tuple(causes.most_common(TOP_CAUSES)),
    )


def _top_users(finished: list[_Row]) -> tuple[UserUse, ...]:
    names: dict[str, str] = {}
    images: Counter[str] = Counter()
    gpu: dict[str, float] = {}
    for row in finished:  # oldest first: the last name seen is the user's latest
        names[row.key] = row.name or names.get(row.key, "")
        images[row.key] += row.images
        gpu[row.key] = gpu.get(row.key, 0.0) + (row.gpu_s or 0.0)
    return tuple(UserUse(key, names[key], count, gpu[key])
                 for key, count in images.most_common(TOP_USERS))
