"""The job journal: round trips, restarts, delivery tracking, charging and migrations."""

from __future__ import annotations

import asyncio
import enum
import sqlite3
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import store as store_module
from engine.errors import JobNotFound
from engine.request import ImageRequest, Origin, Source, User
from engine.store import SCHEMA_VERSION, JobRecord, Store, StoreError

ALICE = User("discord", "1001", "Alice")
BOB = User("telegram", "2002", "Bob")


def make_request(prompt: str = "a red fox", seed: int = 7) -> ImageRequest:
    return ImageRequest(prompt=prompt, seed=seed, steps=20, width=1024, height=1024,
                        guidance=3.5)


def origin_for(user: User) -> Origin:
    return Origin(user.platform, chat_id="c1", message_id="m1")


@pytest.fixture
async def store(tmp_path: Path):
    async with Store(tmp_path / "bot.sqlite3") as opened:
        yield opened


async def add(store: Store, job_id: str, user: User = ALICE, at: float = 1000.0,
              prompt: str = "a red fox") -> int:
    return await store.add_job(job_id, user, origin_for(user), make_request(prompt), at)


AWKWARD_PROMPTS = [
    "'; DROP TABLE jobs; --",
    'a "quoted" fox\'s tail',
    "Robert'); DELETE FROM limit_overrides WHERE ('1'='1",
    "🦊🔥 renard roux, 赤い狐, лиса, ثعلب أحمر",
    "line one\nline two\ttabbed \\ backslash %_ LIKE wildcards",
    "x" * 5000,
    "",
]


@pytest.mark.parametrize("prompt", AWKWARD_PROMPTS)
async def test_round_trip_keeps_every_field(store: Store, prompt: str):
    user = User("discord", "1001", "Al'ice \"🦊\"")
    origin = Origin("discord", chat_id="123", message_id="456",
                    extra={"guild_id": "789", "nested": {"list": [1, "two"]}})
    request = make_request(prompt).with_changes(seed_was_random=True)
    seq = await store.add_job("job-1", user, origin, request, 1234.5)

    record = await store.get_job("job-1")
    assert record == JobRecord(
        job_id="job-1", seq=seq, user=user, origin=origin, request=request, status="queued",
        created_at=1234.5, started_at=None, finished_at=None, error=None, result_path=None,
        delivered_at=None, delivered_to=None, delivery_attempts=0, last_delivery_error=None,
        delivery_given_up=False,
    )
    # The SQL-looking prompt did not touch the schema.
    assert await store.get_limit_override(user) is None
    assert [r.job_id for r in await store.unfinished_jobs()] == ["job-1"]


@settings(max_examples=40, deadline=None)
@given(prompt=st.text(alphabet=st.characters(blacklist_characters="\x00")),
       name=st.text(max_size=20), user_id=st.text(alphabet="0123456789", min_size=1, max_size=20))
def test_any_text_round_trips(tmp_path_factory: pytest.TempPathFactory, prompt: str, name: str,
                              user_id: str):
    path = tmp_path_factory.mktemp("prop") / f"{uuid.uuid4().hex}.sqlite3"

    async def story() -> JobRecord | None:
        async with Store(path) as store:
            await store.add_job("j", User("telegram", user_id, name), Origin("telegram"),
                                make_request(prompt), 1.0)
            return await store.get_job("j")

    record = asyncio.run(story())
    assert record is not None
    assert record.request.prompt == prompt
    assert record.user == User("telegram", user_id)
    assert record.user.display_name == name.encode("utf-8", "replace").decode("utf-8")


async def test_get_job_unknown_is_none(store: Store):
    assert await store.get_job("nope") is None


async def test_status_times(store: Store):
    await add(store, "a")
    await store.set_status("a", "running", at=1001.0)
    record = await store.get_job("a")
    assert (record.status, record.started_at, record.finished_at) == ("running", 1001.0, None)

    await store.set_status("a", "finished", at=1010.0, result_path="outputs/a.png")
    record = await store.get_job("a")
    assert (record.status, record.started_at, record.finished_at) == ("finished", 1001.0, 1010.0)
    assert record.result_path == "outputs/a.png"

    await add(store, "b")
    await store.set_status("b", "running", at=1002.0)
    await store.set_status("b", "failed", at=1003.0, error="out of memory")
    record = await store.get_job("b")
    assert (record.status, record.finished_at, record.error) == ("failed", 1003.0, "out of memory")


async def test_requeue_clears_start(store: Store):
    await add(store, "a")
    await store.set_status("a", "running", at=1001.0)
    await store.set_status("a", "queued", at=1005.0)
    record = await store.get_job("a")
    assert (record.status, record.started_at, record.finished_at) == ("queued", None, None)


async def test_status_accepts_str_enum(store: Store):
    class Status(str, enum.Enum):
        RUNNING = "running"

    await add(store, "a")
    await store.set_status("a", Status.RUNNING, at=1001.0)
    assert (await store.get_job("a")).status == "running"


async def test_bad_calls_raise_clear_errors(store: Store):
    await add(store, "a")
    with pytest.raises(ValueError, match="unknown job status 'done'"):
        await store.set_status("a", "done", at=1.0)
    with pytest.raises(ValueError, match="already in the journal"):
        await add(store, "a")
    with pytest.raises(JobNotFound):
        await store.set_status("missing", "running", at=1.0)
    with pytest.raises(JobNotFound):
        await store.mark_delivered("missing", at=1.0, where="x")
    with pytest.raises(ValueError, match="0 or more"):
        await store.set_limit_override(ALICE, -2)  # -1 is UNLIMITED


async def test_update_request(store: Store):
    await add(store, "a")
    fixed = make_request(seed=123456).with_changes(seed_was_random=True)
    await store.update_request("a", fixed)
    assert (await store.get_job("a")).request == fixed


async def test_journal_survives_reopening(tmp_path: Path):
    path = tmp_path / "deep" / "folder" / "bot.sqlite3"  # parent folders are created
    async with Store(path) as store:
        seqs = [await add(store, job_id, at=1000.0 + i) for i, job_id in enumerate("wxyz")]
        await store.set_status("x", "running", at=1010.0)
        await store.set_status("y", "running", at=1011.0)
        await store.set_status("y", "finished", at=1012.0, result_path="y.png")
    assert seqs == sorted(seqs) and len(set(seqs)) == 4

    store = await Store.open(path)
    try:
        unfinished = await store.unfinished_jobs()
        assert [(r.job_id, r.status) for r in unfinished] == [
            ("w", "queued"), ("x", "running"), ("z", "queued")]
        assert [r.seq for r in unfinished] == [seqs[0], seqs[1], seqs[3]]
        assert await add(store, "later") > max(seqs)
    finally:
        await store.close()
    await store.close()  # closing twice is harmless


async def test_closed_store_says_so(tmp_path: Path):
    store = await Store.open(tmp_path / "db.sqlite3")
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.get_job("a")


async def test_pragmas(store: Store):
    async def pragma(name: str):
        async with store.db.execute(f"PRAGMA {name}") as cursor:
            return (await cursor.fetchone())[0]

    assert await pragma("journal_mode") == "wal"
    assert await pragma("foreign_keys") == 1
    assert await pragma("synchronous") == 2  # FULL: a commit survives a power cut
    assert await pragma("user_version") == SCHEMA_VERSION


async def test_delivery_tracking(store: Store):
    for job_id, user in (("d1", ALICE), ("d2", ALICE), ("t1", BOB), ("q", ALICE), ("c", ALICE)):
        await add(store, job_id, user)
    for job_id in ("d1", "d2", "t1"):
        await store.set_status(job_id, "running", at=0.5)
    await store.set_status("d1", "finished", at=1.0, result_path="d1.png")
    await store.set_status("d2", "failed", at=2.0, error="boom")
    await store.set_status("t1", "finished", at=3.0, result_path="t1.png")
    await store.set_status("c", "cancelled", at=4.0)

    assert [r.job_id for r in await store.undelivered_jobs()] == ["d1", "d2", "t1"]
    assert [r.job_id for r in await store.undelivered_jobs("telegram")] == ["t1"]

    await store.mark_undelivered("d1", at=5.0, error="403 Missing Access")
    await store.mark_undelivered("d1", at=6.0, error="timeout")
    record = await store.get_job("d1")
    assert (record.delivery_attempts, record.last_delivery_error, record.delivered_at) == (
        2, "timeout", None)
    assert record.last_delivery_attempt_at == 6.0
    assert [r.job_id for r in await store.undelivered_jobs("discord")] == ["d1", "d2"]

    await store.mark_delivered("d1", at=7.0, where="discord:channel/123/message/456")
    record = await store.get_job("d1")
    assert (record.delivered_at, record.delivered_to, record.delivery_attempts) == (
        7.0, "discord:channel/123/message/456", 3)

    await store.give_up_delivery("d2", at=8.0, reason="channel deleted")
    record = await store.get_job("d2")
    assert record.delivery_given_up and record.last_delivery_error == "channel deleted"
    assert [r.job_id for r in await store.undelivered_jobs()] == ["t1"]


async def test_jobs_for_user_newest_first_and_platforms_apart(store: Store):
    twin = User("telegram", ALICE.user_id, "Other person")  # same id, other platform
    for i in range(5):
        await add(store, f"a{i}", ALICE, at=1000.0 + i)
    await add(store, "t0", twin, at=1000.0)

    assert [r.job_id for r in await store.jobs_for_user(ALICE)] == ["a4", "a3", "a2", "a1", "a0"]
    assert [r.job_id for r in await store.jobs_for_user(ALICE, limit=2)] == ["a4", "a3"]
    assert await store.jobs_for_user(ALICE, limit=0) == []
    assert [r.job_id for r in await store.jobs_for_user(twin)] == ["t0"]
    assert len(await charged_times(store, ALICE, 0.0)) == 5
    assert len(await charged_times(store, twin, 0.0)) == 1

    await store.set_limit_override(ALICE, 3)
    assert await store.get_limit_override(ALICE) == 3
    assert await store.get_limit_override(twin) is None


async def test_what_counts_against_the_limit(store: Store):
    for i, job_id in enumerate(["queued", "done", "failed", "refunded", "cancel_early",
                                "cancel_late"]):
        await add(store, job_id, at=100.0 + i)
    for job_id in ("done", "failed", "refunded"):
        await store.set_status(job_id, "running", at=150.0)
    await store.set_status("done", "finished", at=200.0)
    await store.set_status("failed", "failed", at=200.0, error="bad prompt")
    await store.set_status("refunded", "failed", at=200.0, error="GPU died")
    await store.refund("refunded")
    await store.set_status("cancel_early", "cancelled", at=200.0)
    await store.set_status("cancel_late", "running", at=150.0)
    await store.set_status("cancel_late", "cancelled", at=200.0)

    # created_at: queued 100, done 101, failed 102, cancel_late 105
    assert len(await charged_times(store, ALICE, 0.0)) == 4
    assert await charged_times(store, ALICE, 0.0) == [100.0, 101.0, 102.0, 105.0]
    assert await charged_times(store, ALICE, 101.0) == [101.0, 102.0, 105.0]  # at/after
    assert len(await charged_times(store, ALICE, 105.5)) == 0


async def test_limit_override_set_replace_remove(store: Store):
    assert await store.get_limit_override(ALICE) is None
    await store.set_limit_override(ALICE, 5)
    await store.set_limit_override(ALICE, 0)
    assert await store.get_limit_override(ALICE) == 0
    await store.set_limit_override(ALICE, None)
    assert await store.get_limit_override(ALICE) is None
    await store.set_limit_override(ALICE, None)  # removing nothing is fine


async def test_concurrent_adds_get_unique_increasing_seqs(store: Store):
    ids = [f"job-{i}" for i in range(60)]
    seqs = await asyncio.gather(*(add(store, job_id, at=float(i)) for i, job_id in enumerate(ids)))
    assert len(set(seqs)) == len(ids)
    records = await store.unfinished_jobs()
    assert sorted(r.job_id for r in records) == sorted(ids)
    assert [r.seq for r in records] == sorted(seqs)
    assert {r.job_id: r.seq for r in records} == dict(zip(ids, seqs, strict=True))


def _make_v1_database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(store_module.MIGRATIONS[0] + "\nPRAGMA user_version = 1;")
        db.execute(
            "INSERT INTO jobs (job_id, platform, user_id, display_name, origin_platform,"
            " origin_json, request_json, status, created_at, started_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("old", "discord", "1001", "Alice", "discord", origin_for(ALICE).to_json(),
             make_request("an old fox").to_json(), "running", 50.0, 51.0),
        )
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1


async def test_migrates_a_v1_database(tmp_path: Path):
    path = tmp_path / "v1.sqlite3"
    _make_v1_database(path)
    async with Store(path) as store:
        async with store.db.execute("PRAGMA user_version") as cursor:
            assert (await cursor.fetchone())[0] == SCHEMA_VERSION
        record = await store.get_job("old")
        assert record.request.prompt == "an old fox"
        assert (record.status, record.delivery_attempts, record.delivery_given_up) == (
            "running", 0, False)
        assert len(await charged_times(store, ALICE, 0.0)) == 1  # old jobs are charged
        await store.set_limit_override(ALICE, 2)  # the v2 table exists
        assert [r.job_id for r in await store.unfinished_jobs()] == ["old"]


async def test_failed_migration_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "bot.sqlite3"
    async with Store(path) as store:
        await add(store, "kept")
    broken = "CREATE TABLE half_done (x INTEGER);\nSELECT * FROM no_such_table;"
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, broken])

    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        await Store.open(path)

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert "half_done" not in tables
        assert db.execute("SELECT job_id FROM jobs").fetchall() == [("kept",)]


async def test_newer_database_is_refused(tmp_path: Path):
    path = tmp_path / "future.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this program"):
        await Store.open(path)


async def test_the_journal_enforces_the_lifecycle(store: Store):
    """Every move the table allows is written; every other one raises and writes nothing."""
    from engine.job import JobStatus
    from engine.lifecycle import TRANSITIONS, InvalidTransition

    route = {"queued": [], "running": ["running"], "finished": ["running", "finished"],
             "failed": ["running", "failed"], "cancelled": ["cancelled"]}
    n = 0
    for old, targets in TRANSITIONS.items():
        for new in JobStatus:
            n += 1
            job_id = f"j{n}"
            await add(store, job_id, at=float(n))
            for step in route[old.value]:
                await store.set_status(job_id, step, at=float(n))
            if new in targets:
                await store.set_status(job_id, new, at=float(n) + 0.5)
                assert (await store.get_job(job_id)).status == new.value
            else:
                with pytest.raises(InvalidTransition, match=f"from {old.value} to {new.value}"):
                    await store.set_status(job_id, new, at=float(n) + 0.5)
                assert (await store.get_job(job_id)).status == old.value
    assert n == 25


async def test_a_duplicate_job_id_is_its_own_error(store: Store):
    from engine.store import DuplicateJobId

    await add(store, "same")
    with pytest.raises(DuplicateJobId):
        await add(store, "same")


async def test_old_zero_overrides_keep_meaning_no_limit_after_the_upgrade(tmp_path):
    """Schema v3: before it, an override of 0 meant no limit; it now means no images, so the
    old rows become -1 (no limit)."""
    import sqlite3

    from engine.store import MIGRATIONS, UNLIMITED

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
    db.execute("INSERT INTO limit_overrides VALUES ('telegram', '42', 0)")
    db.execute("INSERT INTO limit_overrides VALUES ('telegram', '43', 5)")
    db.commit()
    db.close()
    async with Store(path) as store:
        assert await store.get_limit_override(User("telegram", "42")) == UNLIMITED
        assert await store.get_limit_override(User("telegram", "43")) == 5
        await store.set_limit_override(User("telegram", "44"), 0)
        assert await store.get_limit_override(User("telegram", "44")) == 0


async def test_pending_interactions_left_over_are_those_without_a_job(store: Store):
    """Issue 11 row 15 (Discord): a command written down before its job; after a crash only
    those whose job never reached the journal are left over (the others' job answers them)."""
    from engine.pending import PendingInteraction, PendingInteractions

    pending = PendingInteractions(store)
    lost = PendingInteraction("discord:interaction:1", "900", "secret-token-1", "c1", 10.0)
    journalled = PendingInteraction("discord:interaction:2", "900", "secret-token-2", "c1", 11.0)
    answered = PendingInteraction("discord:interaction:3", "900", "secret-token-3", "c1", 12.0)
    for row in (lost, journalled, answered):
        await pending.add(row)
    await store.add_job("j2", ALICE, origin_for(ALICE), make_request(), 11.0,
                        request_key=journalled.request_key)
    await pending.remove(answered.request_key)

    assert await pending.left_over() == [lost]
    assert "secret-token" not in repr(lost)  # a token is never in a repr, so never in a log
    await pending.remove(lost.request_key)
    assert await pending.left_over() == []


async def charged_times(store: Store, user: User, since: float) -> list[float]:
    """When each of ``user``'s charged jobs was asked for (these tests' jobs are one image)."""
    return [at for at, _ in await store.charges_since(since, user=user)]


@pytest.mark.parametrize(("stored", "source"), [
    ({"action": "upscale", "job_id": "ab12cd34", "number": 3, "detail": "2"},
     Source("upscale", "ab12cd34", 3, "2")),
    # journals written before the source was data kept its English sentence
    ("variation (strong) of ab12cd34 #2", Source("variation", "ab12cd34", 2, "strong")),
    ("upscale 2× of ab12cd34 #3", Source("upscale", "ab12cd34", 3, "2")),
    ("", None), (None, None)])
def test_a_journalled_requests_source_reads_back_as_data(stored, source) -> None:
    import json

    request = ImageRequest("fox", 1, 4, 512, 512, 3.5, derived_from=source)
    fields = json.loads(request.to_json())
    fields["derived_from"] = stored
    assert ImageRequest.from_json(json.dumps(fields)) == request
    if source is not None:
        assert ImageRequest.from_json(request.to_json()).derived_from.english() in (
            "upscale 2× of ab12cd34 #3", "variation (strong) of ab12cd34 #2")
