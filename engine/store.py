"""The SQLite job journal: every accepted job, its status, and whether its result was delivered.

The journal is what survives a restart: queued and running jobs come back in their original
order (``unfinished_jobs``), results that never reached the chat come back for another try
(``undelivered_jobs``), and the rate limiter counts a user's recent jobs from it.

One ``aiosqlite`` connection (its own thread) in autocommit mode; every statement is
parameterised, because prompts are user text. The schema is versioned with
``PRAGMA user_version``: ``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``,
each in one transaction.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite

from engine import lifecycle
from engine.errors import N_, JobNotFound
from engine.request import ImageRequest, Origin, User

STATUSES = ("queued", "running", "finished", "failed", "cancelled")
TERMINAL_STATUSES = ("finished", "failed", "cancelled")

# Never edit a migration that has shipped: add a new one at the end.
MIGRATIONS: list[str] = [
    # v1: the job journal.
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL UNIQUE,
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        display_name TEXT NOT NULL DEFAULT '',
        origin_platform TEXT NOT NULL,
        origin_json TEXT NOT NULL,
        request_json TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'queued',
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        error TEXT,
        result_path TEXT
    );
    CREATE INDEX jobs_user_created ON jobs (platform, user_id, created_at);
    CREATE INDEX jobs_status ON jobs (status);
    """,
    # v2: delivery tracking, refunds and per-user limit overrides.
    """
    ALTER TABLE jobs ADD COLUMN delivered_at REAL;
    ALTER TABLE jobs ADD COLUMN delivered_to TEXT;
    ALTER TABLE jobs ADD COLUMN delivery_attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN last_delivery_error TEXT;
    ALTER TABLE jobs ADD COLUMN last_delivery_attempt_at REAL;
    ALTER TABLE jobs ADD COLUMN delivery_given_up_at REAL;
    ALTER TABLE jobs ADD COLUMN charged INTEGER NOT NULL DEFAULT 1;
    CREATE TABLE limit_overrides (
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        images_per_window INTEGER NOT NULL CHECK (images_per_window >= 0),
        PRIMARY KEY (platform, user_id)
    );
    """,
    # v3: an override of 0 now means no images at all; -1 means no limit, which is what 0
    # meant before (the old rows keep their meaning).
    """
    CREATE TABLE limit_overrides_v3 (
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        images_per_window INTEGER NOT NULL CHECK (images_per_window >= -1),
        PRIMARY KEY (platform, user_id)
    );
    INSERT INTO limit_overrides_v3 (platform, user_id, images_per_window)
        SELECT platform, user_id, CASE images_per_window WHEN 0 THEN -1
                                  ELSE images_per_window END FROM limit_overrides;
    DROP TABLE limit_overrides;
    ALTER TABLE limit_overrides_v3 RENAME TO limit_overrides;
    """,
    # v4: the platform's own id of the command a job came from (a Telegram update id), so that
    # a command the platform sends again after a crash is not queued twice.
    """
    ALTER TABLE jobs ADD COLUMN request_key TEXT;
    CREATE UNIQUE INDEX jobs_request_key ON jobs (request_key) WHERE request_key IS NOT NULL;
    """,
    # v5: commands received and not yet answered (``engine/pending.py``): a crash before their
    # job was journalled leaves the row, and the next start tells the user to ask again.
    """
    CREATE TABLE pending_interactions (
        request_key TEXT PRIMARY KEY,
        application_id TEXT NOT NULL,
        token TEXT NOT NULL,
        channel_id TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    """,
    # v6: answers to commands (refusals, errors) decided but not yet posted: the command counts
    # as received once its answer is here, so a crash before the post still answers it.
    """
    CREATE TABLE pending_replies (
        reply_key TEXT PRIMARY KEY,
        platform TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        reply_to TEXT NOT NULL,
        thread_id TEXT NOT NULL DEFAULT '',
        text TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # v7: a job of N images (``--n``) counts as N against the rate limit.
    """
    ALTER TABLE jobs ADD COLUMN images INTEGER NOT NULL DEFAULT 1;
    """,
    # v8: quotas by GPU time, per-chat caps and usage statistics (issue 13): what the job was
    # priced at in images of the default size (``engine/costs.py``; NULL = before v8, priced as
    # its images), the chat it counts against as a whole ('' = none, e.g. a private chat; rows
    # from before v8 count for their user only), and its measured GPU seconds and median s/step.
    """
    ALTER TABLE jobs ADD COLUMN cost REAL;
    ALTER TABLE jobs ADD COLUMN group_key TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN gpu_s REAL;
    ALTER TABLE jobs ADD COLUMN step_s REAL;
    CREATE INDEX jobs_group_created ON jobs (group_key, created_at);
    CREATE INDEX jobs_created ON jobs (created_at);
    """,
    # v9: a pending reply may carry buttons (a grid's U/V message): the platform's own JSON.
    """
    ALTER TABLE pending_replies ADD COLUMN markup TEXT NOT NULL DEFAULT '';
    """,
    # v10: the reply language an admin set for a chat (/language; engine/chat_languages.py).
    """
    CREATE TABLE chat_languages (
        chat_key TEXT PRIMARY KEY,
        language TEXT NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
UNLIMITED = -1  # a per-user override meaning "no limit"

# A job is charged unless the engine refunded it or it was cancelled before it ever ran.
_CHARGED = "charged = 1 AND NOT (status = 'cancelled' AND started_at IS NULL)"


class StoreError(RuntimeError):
    """The database cannot be used (for example, it was written by a newer version)."""


class DuplicateJobId(ValueError):
    """A job with this id is in the journal already (the engine draws another id)."""


class DuplicateRequest(ValueError):
    """The command with this request key has its job already (the platform sent it again)."""


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    seq: int
    user: User
    origin: Origin
    request: ImageRequest
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    result_path: str | None
    delivered_at: float | None
    delivered_to: str | None
    delivery_attempts: int
    last_delivery_error: str | None
    delivery_given_up: bool
    last_delivery_attempt_at: float | None = None  # for the engine's retry back-off

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        return cls(
            job_id=row["job_id"],
            seq=row["seq"],
            user=User(row["platform"], row["user_id"], row["display_name"]),
            origin=Origin.from_json(row["origin_json"]),
            request=ImageRequest.from_json(row["request_json"]),
            status=row["status"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            error=row["error"],
            result_path=row["result_path"],
            delivered_at=row["delivered_at"],
            delivered_to=row["delivered_to"],
            delivery_attempts=row["delivery_attempts"],
            last_delivery_error=row["last_delivery_error"],
            delivery_given_up=row["delivery_given_up_at"] is not None,
            last_delivery_attempt_at=row["last_delivery_attempt_at"],
        )


class Store:
    """The journal. ``async with Store(path) as store:`` or ``store = await Store.open(path)``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None

    @classmethod
    async def open(cls, path: str | Path) -> Store:
        store = cls(path)
        await store.connect()
        return store

    async def connect(self) -> None:
        if self._db is not None:
            return
        self._check_openable()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, single statements autocommit.
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when it returns, so a power cut loses no accepted job
            # and no delivery mark (a handful of small writes per image: milliseconds)
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
            await _migrate(db)
        except BaseException:
            await db.close()
            raise
        self._db = db

    def _check_openable(self) -> None:
        """Open the file once without aiosqlite: a journal that cannot be opened is one clear
        sentence with the path and the fix (aiosqlite's thread, failing, outlived the event
        loop and printed a second traceback)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            sqlite3.connect(self.path).close()
        except (OSError, sqlite3.Error) as exc:
            uid = os.getuid() if hasattr(os, "getuid") else "?"
            raise StoreError(
                f"cannot open the job journal {self.path} ({exc}): make {self.path.parent} "
                f"writable by this user (uid {uid}), or set engine.database") from None

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("the job store is not open")
        return self._db

    # -- writing the journal ---------------------------------------------------------------

    async def add_job(
        self, job_id: str, user: User, origin: Origin, request: ImageRequest, created_at: float,
        request_key: str | None = None, cost: float | None = None, group_key: str = "",
    ) -> int:
        """Record a new queued job; return its ``seq`` (strictly increasing, never reused).
        ``request_key``: the command's own id on its platform; one job per key. ``cost``: its
        price in images of the default size; ``group_key``: the chat it counts against."""
        try:
            async with self.db.execute(
                "INSERT INTO jobs (job_id, platform, user_id, display_name, origin_platform,"
                " origin_json, request_json, status, created_at, request_key, images, cost,"
                " group_key) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?) RETURNING seq",
                (job_id, user.platform, user.user_id, storable(user.display_name), origin.platform,
                 origin.to_json(), request.to_json(), created_at, request_key, request.count,
                 cost, group_key),
            ) as cursor:
                row = await cursor.fetchone()
        except sqlite3.IntegrityError as exc:
            if request_key is not None and "request_key" in str(exc):
                raise DuplicateRequest(f"request {request_key!r} has its job already") from None
            raise DuplicateJobId(f"job id {job_id!r} is already in the journal") from None
        assert row is not None  # RETURNING always yields the inserted row
        return int(row[0])

    async def set_status(
        self,
        job_id: str,
        status: str,
        *,
        at: float,
        error: str | None = None,
        result_path: str | None = None,
    ) -> None:
        """Move a job to ``status`` along ``lifecycle.TRANSITIONS``; ``error`` and
        ``result_path`` are stored as given. A move the table does not allow raises
        ``lifecycle.InvalidTransition`` and writes nothing.

        'running' sets started_at; a terminal status sets finished_at; 'queued' (a job put
        back in line, e.g. after a restart) clears both, so it is waiting again.
        """
        status = str(getattr(status, "value", status))  # accepts a str Enum member too
        if status not in STATUSES:
            raise ValueError(f"unknown job status {status!r}; allowed: {', '.join(STATUSES)}")
        if status == "queued":
            times = "started_at = NULL, finished_at = NULL"
        elif status == "running":
            times = "started_at = :at, finished_at = NULL"
        else:
            times = "finished_at = :at"
        allowed = lifecycle.sources(status)
        marks = ", ".join(f":from{i}" for i in range(len(allowed)))
        params = {"status": status, "at": at, "error": error, "result_path": result_path,
                  **{f"from{i}": s for i, s in enumerate(allowed)}}
        async with self.db.execute(
            f"UPDATE jobs SET status = :status, {times}, error = :error,"
            f" result_path = :result_path WHERE job_id = :job_id AND status IN ({marks})",
            {**params, "job_id": job_id},
        ) as cursor:
            changed = cursor.rowcount
        if changed == 0:
            record = await self.get_job(job_id)
            if record is None:
                raise JobNotFound(N_("There is no job {job_id}."), job_id=job_id)
            lifecycle.check(job_id, record.status, status)  # raises InvalidTransition

    async def update_origin(self, job_id: str, origin: Origin) -> None:
        """Adapter details learnt after the job was accepted (its status message's id)."""
        await self._update(job_id, "origin_json = :origin", {"origin": origin.to_json()})

    async def update_request(self, job_id: str, request: ImageRequest) -> None:
        await self._update(job_id, "request_json = :request", {"request": request.to_json()})

    async def refund(self, job_id: str) -> None:
        """The job no longer counts against its user's rate limit (the engine's fault)."""
        await self._update(job_id, "charged = 0", {})

    async def record_timing(self, job_id: str, *, gpu_s: float, step_s: float | None) -> None:
        """The job's measured GPU seconds and median s/step (costs and ``/stats``)."""
        await self._update(job_id, "gpu_s = :gpu_s, step_s = :step_s",
                           {"gpu_s": gpu_s, "step_s": step_s})

    async def mark_delivered(self, job_id: str, *, at: float, where: str) -> None:
        """The result reached the chat. ``delivery_attempts`` counts this attempt too."""
        await self._update(
            job_id,
            "delivered_at = :at, delivered_to = :where, last_delivery_attempt_at = :at,"
            " delivery_attempts = delivery_attempts + 1",
            {"at": at, "where": where},
        )

    async def mark_undelivered(self, job_id: str, *, at: float, error: str) -> None:
        """One delivery attempt failed at ``at``; the job stays in ``undelivered_jobs``."""
        await self._update(
            job_id,
            "delivery_attempts = delivery_attempts + 1, last_delivery_error = :error,"
            " last_delivery_attempt_at = :at",
            {"error": error, "at": at},
        )

    async def give_up_delivery(self, job_id: str, *, at: float, reason: str) -> None:
        await self._update(
            job_id,
            "delivery_given_up_at = :at, last_delivery_error = :reason",
            {"at": at, "reason": reason},
        )

    async def _update(self, job_id: str, assignments: str, params: dict[str, Any]) -> None:
        # ``assignments`` is always a constant written in this module; values go in ``params``.
        async with self.db.execute(
            f"UPDATE jobs SET {assignments} WHERE job_id = :job_id", {**params, "job_id": job_id}
        ) as cursor:
            changed = cursor.rowcount
        if changed == 0:
            raise JobNotFound(N_("There is no job {job_id}."), job_id=job_id)

    async def prune(self, before: float) -> list[str | None]:
        """Delete the rows of jobs accepted before ``before`` that are over and answered (or
        given up, or cancelled); returns each one's result file (None: it had none), for the
        caller to delete. Queued,
        running and undelivered jobs stay whatever their age."""
        async with self.db.execute(
            "DELETE FROM jobs WHERE created_at < ? AND status IN ('finished', 'failed', "
            "'cancelled') AND (delivered_at IS NOT NULL OR delivery_given_up_at IS NOT NULL "
            "OR status = 'cancelled') RETURNING result_path",
            (before,),
        ) as cursor:
            rows = await cursor.fetchall()
        return [str(row[0]) if row[0] else None for row in rows]

    # -- reading the journal ---------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobRecord | None:
        records = await self._select("job_id = ?", (job_id,))
        return records[0] if records else None

    async def unfinished_jobs(self) -> list[JobRecord]:
        """Queued and running jobs, in the order they were accepted."""
        return await self._select("status IN ('queued', 'running')", (), "seq")

    async def undelivered_jobs(self, platform: str | None = None) -> list[JobRecord]:
        """Finished or failed jobs whose answer has not reached the chat (and not given up)."""
        where = ("status IN ('finished', 'failed') AND delivered_at IS NULL"
                 " AND delivery_given_up_at IS NULL")
        if platform is None:
            return await self._select(where, (), "seq")
        return await self._select(where + " AND origin_platform = ?", (platform,), "seq")

    async def init_images(self) -> set[str]:
        """Every picture a job in the journal starts from (retention keeps these files)."""
        async with self.db.execute(
            "SELECT DISTINCT json_extract(request_json, '$.init_image') FROM jobs") as cursor:
            return {str(row[0]) for row in await cursor.fetchall() if row[0]}

    async def jobs_for_user(self, user: User, limit: int = 20) -> list[JobRecord]:
        """The user's most recent jobs, newest first."""
        return await self._select(
            "platform = ? AND user_id = ?", (user.platform, user.user_id),
            "seq DESC LIMIT ?", (max(0, limit),),
        )

    async def charges_since(self, since: float, *, user: User | None = None, group: str = "",
                            priced: bool = False) -> list[tuple[float, float]]:
        """(when asked for, amount) of each charged job of ``user`` (or, without one, of every
        user in chat ``group``) asked for at or after ``since``, oldest first. The amount is
        its images, or with ``priced`` its cost in images of the default size."""
        amount = "COALESCE(cost, images)" if priced else "images"
        params: tuple[str, ...]
        if user is not None:
            who, params = "platform = ? AND user_id = ?", (user.platform, user.user_id)
        else:
            who, params = "group_key = ?", (group,)
        async with self.db.execute(
            f"SELECT created_at, {amount} FROM jobs WHERE {who} AND created_at >= ?"
            f" AND {_CHARGED} ORDER BY created_at", (*params, since),
        ) as cursor:
            return [(float(at), float(spent)) for at, spent in await cursor.fetchall()]

    async def recent_step_times(self, limit: int = 500) -> list[tuple[int, float]]:
        """(pixels, median s/step) of the last ``limit`` jobs that measured one, oldest first:
        the cost model's calibration after a restart."""
        async with self.db.execute(
            "SELECT request_json, step_s FROM jobs WHERE step_s IS NOT NULL"
            " ORDER BY seq DESC LIMIT ?", (max(0, limit),),
        ) as cursor:
            rows = list(await cursor.fetchall())
        measured = []
        for text, step_s in reversed(rows):
            request = ImageRequest.from_json(text)
            measured.append((request.width * request.height, float(step_s)))
        return measured

    async def _select(
        self, where: str, params: tuple[Any, ...], order: str = "seq", tail: tuple[Any, ...] = ()
    ) -> list[JobRecord]:
        # ``where``/``order`` are constants from this module; values go in ``params``/``tail``.
        async with self.db.execute(
            f"SELECT * FROM jobs WHERE {where} ORDER BY {order}", params + tail
        ) as cursor:
            return [JobRecord.from_row(row) for row in await cursor.fetchall()]

    # -- per-user limit overrides ----------------------------------------------------------

    async def set_limit_override(self, user: User, images_per_window: int | None) -> None:
        """Give ``user`` their own images-per-window (0 = no images at all, ``UNLIMITED`` =
        no limit); ``None`` removes it (back to the config's limit)."""
        if images_per_window is None:
            await self.db.execute(
                "DELETE FROM limit_overrides WHERE platform = ? AND user_id = ?",
                (user.platform, user.user_id),
            )
            return
        if isinstance(images_per_window, bool) or not isinstance(images_per_window, int) \
                or images_per_window < UNLIMITED:
            raise ValueError(
                f"images_per_window = {images_per_window!r} must be a whole number, 0 or more "
                f"(or {UNLIMITED} for no limit)"
            )
        await self.db.execute(
            "INSERT INTO limit_overrides (platform, user_id, images_per_window) VALUES (?, ?, ?)"
            " ON CONFLICT (platform, user_id) DO UPDATE SET"
            " images_per_window = excluded.images_per_window",
            (user.platform, user.user_id, images_per_window),
        )

    async def get_limit_override(self, user: User) -> int | None:
        async with self.db.execute(
            "SELECT images_per_window FROM limit_overrides WHERE platform = ? AND user_id = ?",
            (user.platform, user.user_id),
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else None


async def schema_version(db: aiosqlite.Connection) -> int:
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _migrate(db: aiosqlite.Connection) -> None:
    """Apply the migrations this database lacks, each in its own transaction."""
    version = await schema_version(db)
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the database is at schema version {version}, newer than this program's "
            f"{len(MIGRATIONS)}; upgrade the bot or use another database file"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        # BEGIN inside the script: executescript would otherwise commit statement by statement.
        try:
            await db.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;"
            )
        except sqlite3.Error:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise


def journal_size_bytes(path: str | Path) -> int:
    """The journal's size on disk: the database and its write-ahead log."""
    return sum(p.stat().st_size for p in (Path(path), Path(f"{path}-wal")) if p.exists())


def storable(text: str) -> str:
    """Text SQLite can store as UTF-8: a lone surrogate (valid in JSON, not in UTF-8) becomes
    '?'."""
    return text.encode("utf-8", "replace").decode("utf-8")
