"""The job's lifecycle at its edges (issue 11's rows), through the real engine on the dry-run
backend: cancels during a start and during a shutdown, the charging rule, recovered jobs let go,
job id collisions, console deliveries without saved outputs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine import engine as engine_module
from engine.job import Cancelled, JobStatus
from engine.lifecycle import TRANSITIONS, check, sources
from tests.conftest import ORIGIN, discord_user, make_request


async def running(job) -> None:
    while job.status is not JobStatus.RUNNING:
        await asyncio.sleep(0.001)


def test_the_table_has_final_end_states_and_one_way_back_to_the_queue():
    for end in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED):
        assert TRANSITIONS[end] == frozenset()
    assert sources("queued") == ("running",)  # only a shutdown or a crash puts a job back
    assert set(sources("cancelled")) == {"queued", "running"}
    check("a", "queued", "running")
    with pytest.raises(RuntimeError, match="cannot go from finished to running"):
        check("a", "finished", "running")


async def test_cancelling_a_running_job_keeps_it_charged(engine_factory, backend, config):
    """Row 5: five jobs run nearly to the end and cancelled must not leave the quota unused."""
    config.rate_limit.images_per_window = 2
    backend.step_seconds = 0.01
    engine = await engine_factory()
    user = discord_user("1")
    job = await engine.submit(user, make_request(steps=50), ORIGIN)
    await running(job)
    while not [e for e in job.events_so_far if type(e).__name__ == "Progress"]:
        await asyncio.sleep(0.001)
    assert await job.cancel() is True
    assert await job.wait() is JobStatus.CANCELLED
    assert (await engine.quota(user)).used == 1
    queued_then_cancelled = None
    engine.pause()
    queued_then_cancelled = await engine.submit(user, make_request(), ORIGIN)
    assert await queued_then_cancelled.cancel() is True
    assert (await engine.quota(user)).used == 1  # never ran: refunded


async def test_a_cancel_while_the_job_is_being_started_is_honoured(engine_factory, backend,
                                                                    monkeypatch):
    """Row 6: between leaving the queue and its first step a job could not be cancelled."""
    engine = await engine_factory()
    started = asyncio.Event()
    release = asyncio.Event()
    real_set_status = engine.store.set_status

    async def slow_set_status(job_id, status, **kw):
        if status == "running":
            started.set()
            await release.wait()
        return await real_set_status(job_id, status, **kw)

    monkeypatch.setattr(engine.store, "set_status", slow_set_status)
    job = await engine.submit(discord_user("1"), make_request(), ORIGIN)
    await started.wait()
    assert job.status is JobStatus.QUEUED and job.position() is None  # being started
    assert await job.cancel() is True
    release.set()
    assert await job.wait() is JobStatus.CANCELLED
    assert (await engine.job_record(job.id)).status == "cancelled"
    assert (await engine.quota(discord_user("1"))).used == 0  # it never ran


async def test_a_cancel_during_a_shutdown_ends_the_job_and_the_drain_at_once(
        engine_factory, backend, config):
    """Row 1: the job was left 'running', ran again after the restart, and the drain waited
    the whole grace."""
    backend.gate = threading.Event()
    engine = await engine_factory()
    job = await engine.submit(discord_user("1"), make_request(steps=5), ORIGIN)
    await running(job)
    drain = asyncio.create_task(engine.drain(grace_s=30))
    await asyncio.sleep(0.05)
    assert not drain.done()
    assert await job.cancel() is True
    backend.gate.set()
    await asyncio.wait_for(drain, 5)  # not the 30 s grace
    assert job.status is JobStatus.CANCELLED
    record = await engine.job_record(job.id)
    assert record.status == "cancelled"
    assert [r.job_id for r in await engine.store.unfinished_jobs()] == []  # never runs again
    await asyncio.wait_for(engine.drain(grace_s=30), 1)  # a second drain: the same, done


async def put_back_by_a_shutdown(engine_factory, backend):  # type: ignore[no-untyped-def]
    """A slow job still running when a short-graced drain ends: put back in line."""
    backend.step_seconds = 0.05
    engine = await engine_factory()
    job = await engine.submit(discord_user("1"), make_request(steps=100), ORIGIN)
    await running(job)
    await asyncio.wait_for(engine.drain(grace_s=0.1), 5)
    assert (await engine.job_record(job.id)).status == "queued"
    return engine, job


async def test_a_shutdown_past_the_grace_puts_the_job_back_in_line(engine_factory, backend):
    engine, _ = await put_back_by_a_shutdown(engine_factory, backend)
    assert (await engine.quota(discord_user("1"))).used == 1  # still charged: it will run


async def test_recovered_jobs_are_let_go_once_delivered(engine_factory, config, backend):
    """Row 7: recovered jobs (and their PNGs) stayed in memory for the life of the process."""
    engine = await engine_factory()
    engine.pause()
    jobs = [await engine.submit(discord_user("1"), make_request(f"p{i}"), ORIGIN)
            for i in range(3)]
    await engine.shutdown(grace_s=1)
    again = await engine_factory()
    recovered = again.recovered_jobs("discord")
    assert [j.id for j in recovered] == [j.id for j in jobs]
    for job in recovered:
        await job.wait()
        await again.mark_delivered(job, "discord:1")
    assert again.recovered_jobs("discord") == [] and not again._recovered
    assert all(again.get_job(j.id) is None for j in jobs)


async def test_recovered_jobs_that_finish_before_their_adapter_starts_stay_to_be_delivered(
        engine_factory, backend):
    """Found by the load test: a restarted engine runs its recovered jobs at once, before the
    adapters ask for them; once more than KEEP_FINISHED_JOBS had finished, the first ones were
    forgotten with their result and never delivered."""
    from engine.engine import KEEP_FINISHED_JOBS

    engine = await engine_factory()
    engine.pause()
    jobs = [await engine.submit(discord_user(str(i)), make_request(f"p{i}"), ORIGIN)
            for i in range(KEEP_FINISHED_JOBS + 5)]
    await engine.shutdown(grace_s=1)
    again = await engine_factory()  # runs them all before anyone asks
    for job in list(again._recovered):
        await job.wait()
    recovered = again.recovered_jobs("discord")
    assert [j.id for j in recovered] == [j.id for j in jobs]
    assert all(j.result_now is not None for j in recovered)


async def test_a_job_id_collision_draws_another_id(engine_factory, monkeypatch):
    """Row 8: a repeated id raised a bare ValueError from the store."""
    engine = await engine_factory()
    engine.pause()
    ids = iter(["aaaa0001", "aaaa0001", "aaaa0001", "bbbb0002"])
    monkeypatch.setattr(engine_module, "new_job_id", lambda: next(ids))
    first = await engine.submit(discord_user("1"), make_request(), ORIGIN)
    second = await engine.submit(discord_user("1"), make_request(), ORIGIN)
    assert (first.id, second.id) == ("aaaa0001", "bbbb0002")
    monkeypatch.setattr(engine_module, "new_job_id", lambda: "aaaa0001")
    from engine.errors import EngineError

    with pytest.raises(EngineError, match="please try again"):
        await engine.submit(discord_user("1"), make_request(), ORIGIN)


async def test_without_saved_outputs_a_file_delivery_keeps_its_file(engine_factory, config,
                                                                    tmp_path):
    """Row 9: the console said "saved to X" and X was deleted right after."""
    from pathlib import Path

    config.engine.save_outputs = False
    engine = await engine_factory()
    chat = await engine.submit(discord_user("1"), make_request("chat"), ORIGIN)
    local = await engine.submit(discord_user("1"), make_request("console"), ORIGIN)
    chat_path = Path((await chat.result()).path)
    local_path = Path((await local.result()).path)
    await engine.mark_delivered(chat, "discord:1")
    await engine.mark_delivered(local, f"console:{local_path}", keep_file=True)
    assert not chat_path.exists() and local_path.exists()


async def test_cancelled_events_name_who_cancelled(engine_factory, backend, config):
    config.access.discord_admins = ["boss"]
    backend.gate = threading.Event()
    engine = await engine_factory()
    job = await engine.submit(discord_user("1"), make_request(), ORIGIN)
    await running(job)
    assert await engine.cancel(job.id, discord_user("boss")) is True
    backend.gate.set()
    await job.wait()
    assert job.events_so_far[-1] == Cancelled(by_owner=False)


async def test_the_gpu_starts_the_next_job_while_the_last_image_is_saved(
        engine_factory, backend, monkeypatch):
    """Issue 10 item 4: encoding and saving run beside the next job; a cancel of a job whose
    image is being saved is refused politely, and the image still arrives."""
    engine = await engine_factory()
    saving = threading.Event()
    release = threading.Event()
    real_save = engine._save

    def slow_save(job, image):
        if job.request.prompt == "first":
            saving.set()
            release.wait(5)
        return real_save(job, image)

    monkeypatch.setattr(engine, "_save", slow_save)
    first = await engine.submit(discord_user("1"), make_request("first"), ORIGIN)
    second = await engine.submit(discord_user("2"), make_request("second"), ORIGIN)
    while not saving.is_set():
        await asyncio.sleep(0.001)
    assert await second.wait() is JobStatus.FINISHED  # ran while the first was being saved
    assert first.status is JobStatus.RUNNING
    assert await first.cancel() is False  # made already: it is being saved
    release.set()
    assert await first.wait() is JobStatus.FINISHED


async def test_a_failing_save_fails_that_job_only(engine_factory, monkeypatch):
    engine = await engine_factory()
    real_save = engine._save

    def save(job, image):
        if job.request.prompt == "doomed":
            raise OSError("No space left on device")
        return real_save(job, image)

    monkeypatch.setattr(engine, "_save", save)
    doomed = await engine.submit(discord_user("1"), make_request("doomed"), ORIGIN)
    fine = await engine.submit(discord_user("1"), make_request("fine"), ORIGIN)
    assert await doomed.wait() is JobStatus.FAILED
    assert await fine.wait() is JobStatus.FINISHED
    assert (await engine.job_record(doomed.id)).status == "failed"
    assert (await engine.quota(discord_user("1"))).used == 1  # the bot's fault: refunded


async def test_a_shutdown_waits_for_images_being_saved(engine_factory, monkeypatch):
    engine = await engine_factory()
    real_save = engine._save
    saving = threading.Event()

    def slow_save(job, image):
        saving.set()
        import time

        time.sleep(0.2)
        return real_save(job, image)

    monkeypatch.setattr(engine, "_save", slow_save)
    job = await engine.submit(discord_user("1"), make_request(), ORIGIN)
    while not saving.is_set():
        await asyncio.sleep(0.001)
    store = engine.store
    await engine.shutdown(grace_s=5)
    assert job.status is JobStatus.FINISHED
    await store.connect()
    assert (await store.get_job(job.id)).status == "finished"
    await store.close()


async def test_queue_positions_are_announced_sparingly_but_always_near_the_front(
        engine_factory, config):
    """Issue 11 row 17: 1,000 queued jobs got a position event every time the queue moved
    (503,500 events); now each hears of the front places and of moves of a fifth or more."""
    from engine.job import Queued

    config.engine.max_queue_total = 2000
    config.engine.max_queue_per_user = 2000
    config.rate_limit.images_per_window = 0
    engine = await engine_factory()
    engine.pause()
    jobs = [await engine.submit(discord_user("1"), make_request(f"p{i}", steps=1), ORIGIN)
            for i in range(300)]
    engine.resume()
    for job in jobs:
        await job.wait()
    counts = [sum(isinstance(e, Queued) for e in job.events_so_far) for job in jobs]
    assert sum(counts) < 300 * 40  # was 300 * 301 / 2 = 45,150
    last = jobs[-1].events_so_far
    positions = [e.position for e in last if isinstance(e, Queued)]
    assert positions[0] == 300 and positions[-10:] == list(range(10, 0, -1))
    assert all(b < a for a, b in zip(positions, positions[1:], strict=False))


async def test_retention_prunes_answered_jobs_and_their_files_but_keeps_the_rest(
        engine_factory, config, clock):
    """Issue 11 row 10: nothing was ever pruned."""
    from pathlib import Path

    config.engine.keep_outputs_days = 30
    engine = await engine_factory()
    user = discord_user("1")
    delivered = await engine.submit(user, make_request("delivered"), ORIGIN)
    undelivered = await engine.submit(user, make_request("undelivered"), ORIGIN)
    for job in (delivered, undelivered):
        await job.wait()
    await engine.mark_delivered(delivered, "discord:1")
    await engine.mark_undelivered(undelivered, "502")
    engine.pause()
    cancelled = await engine.submit(user, make_request("cancelled"), ORIGIN)
    await cancelled.cancel()
    waiting = await engine.submit(user, make_request("waiting"), ORIGIN)
    paths = {j.id: Path((await engine.job_record(j.id)).result_path or "")
             for j in (delivered, undelivered)}
    clock.advance(29 * 86400)
    assert await engine.prune() == 0  # nothing is 30 days old yet
    clock.advance(2 * 86400)
    assert await engine.prune() == 2  # the delivered and the cancelled job
    assert await engine.job_record(delivered.id) is None and not paths[delivered.id].exists()
    assert await engine.job_record(cancelled.id) is None
    assert (await engine.job_record(undelivered.id)) is not None  # until it is given up
    assert paths[undelivered.id].exists()
    assert (await engine.job_record(waiting.id)).status == "queued"


def test_retention_shorter_than_the_windows_it_must_cover_is_refused(tmp_path):
    from engine.config import ConfigError, load_config

    path = tmp_path / "config.toml"
    path.write_text("[engine]\nkeep_outputs_days = 0.5\n")
    with pytest.raises(ConfigError, match="keep_outputs_days"):
        load_config(path)
    path.write_text("[engine]\nkeep_outputs_days = 0\n")
    assert load_config(path).engine.keep_outputs_days == 0


async def test_a_cancel_after_the_shutdown_put_the_job_back_still_cancels_it(
        engine_factory, backend):
    """Review: a cancel arriving while (or after) the shutdown put a job back to queued was
    answered True or 'already over', and the job ran again after the restart."""
    engine, job = await put_back_by_a_shutdown(engine_factory, backend)
    assert await job.cancel() is True
    assert (await engine.job_record(job.id)).status == "cancelled"
    assert job.status is JobStatus.CANCELLED
    # back in line it was a queued job again, and a queued job cancelled is refunded
    assert (await engine.quota(discord_user("1"))).used == 0


def test_background_retry_delays_never_overflow_and_must_be_positive(tmp_path):
    from bot.delivery import RetryPolicy
    from engine.config import ConfigError, load_config

    policy = RetryPolicy(first_delay_s=2, max_delay_s=300)
    assert policy.delay(5000) == 300
    path = tmp_path / "config.toml"
    path.write_text("[delivery]\nmax_delay_s = 0\n")
    with pytest.raises(ConfigError, match="delivery.max_delay_s"):
        load_config(path)


async def test_a_one_off_engine_leaves_the_bots_unfinished_jobs_alone(engine_factory, config,
                                                                     backend):
    """Review: `python -m bot imagine` beside a running bot re-queued the bot's running job
    (both then ran it) and ran its queue."""
    from engine.engine import Engine

    bot = await engine_factory()
    bot.pause()
    queued = await bot.submit(discord_user("1"), make_request("the bot's"), ORIGIN)
    one_off = Engine(config, backend, recover=False)
    async with one_off:
        job = await one_off.submit(discord_user("2"), make_request("mine"), ORIGIN)
        assert await job.wait() is JobStatus.FINISHED
        assert one_off.recovered_jobs("discord") == []
    assert [p for _, p in backend.order] == ["mine"]
    assert (await bot.job_record(queued.id)).status == "queued"


async def test_a_step_that_never_returns_does_not_hold_the_shutdown(config, monkeypatch):
    """Review: after the stop limit, closing the backend queued behind the hung step."""
    import time

    from engine.engine import Engine
    from engine.worker import GpuWorker
    from tests.conftest import RecordingBackend

    monkeypatch.setattr(engine_module, "STOP_WAIT_S", 0.2)
    hung = threading.Event()

    class Hanging(RecordingBackend):
        def generate(self, request, on_step):  # type: ignore[no-untyped-def]
            hung.wait(5)  # never looks at the abort flag
            return super().generate(request, on_step)

    engine = Engine(config, Hanging())
    await engine.__aenter__()
    job = await engine.submit(discord_user("1"), make_request(), ORIGIN)
    await running(job)
    started = time.monotonic()
    try:
        await engine.shutdown(grace_s=0.1)
        assert time.monotonic() - started < 2.0
        assert GpuWorker.abandoned
    finally:
        hung.set()
        GpuWorker.abandoned = False
