"""The engine's queue: one job at a time, fair order, events, cancellation, caps, faults."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine.errors import AccessDenied, JobNotFound, QueueFull, RateLimited
from engine.job import Cancelled, Failed, Finished, JobStatus, Progress, Queued, Started
from engine.png import read_parameters
from tests.conftest import ORIGIN, discord_user, make_request


async def test_events_from_queued_to_finished_png_with_seed(engine_factory):
    engine = await engine_factory()
    job = await engine.submit(discord_user("1"), make_request(seed=7, steps=4), ORIGIN)
    events = [e async for e in job.events()]
    assert isinstance(events[0], Queued) and events[0].position == 1
    assert isinstance(events[1], Started)
    steps = [e for e in events if isinstance(e, Progress)]
    assert [(p.step, p.total) for p in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert steps[-1].eta_s == 0.0
    assert isinstance(events[-1], Finished)
    result = await job.result()
    assert result.png.startswith(b"\x89PNG")
    params = read_parameters(result.png)
    assert params["Seed"] == "7" and params["Steps"] == "4" and params["prompt"] == "a red fox"
    record = await engine.job_record(job.id)
    assert record.status == "finished" and record.result_path == result.path


async def test_fair_round_robin_and_one_at_a_time(engine_factory, backend):
    engine = await engine_factory()
    engine.pause()
    jobs = [await engine.submit(discord_user("A"), make_request(f"A{i}"), ORIGIN)
            for i in range(5)]
    for uid in "BCDEF":
        jobs.append(await engine.submit(discord_user(uid), make_request(uid), ORIGIN))
    assert [j.position() for j in jobs] == [1, 7, 8, 9, 10, 2, 3, 4, 5, 6]
    engine.resume()
    await asyncio.gather(*(j.wait() for j in jobs))
    assert [p for _, p in backend.order] == ["A0", "B", "C", "D", "E", "F", "A1", "A2", "A3", "A4"]
    assert backend.max_running == 1
    assert all(name.startswith("gpu-worker") for name in backend.thread_names)


async def test_loop_stays_free_while_an_image_renders(engine_factory, backend):
    backend.gate = threading.Event()
    engine = await engine_factory()
    first = await engine.submit(discord_user("1"), make_request("slow"), ORIGIN)
    while first.status is not JobStatus.RUNNING:
        await asyncio.sleep(0.001)
    # The worker thread is blocked inside generate(); the loop still accepts a new job.
    second = await engine.submit(discord_user("2"), make_request("next"), ORIGIN)
    assert second.position() == 1 and not backend.gate.is_set()
    backend.gate.set()
    assert (await second.result()).request.prompt == "next"


async def test_positions_update_as_the_queue_moves(engine_factory):
    engine = await engine_factory()
    engine.pause()
    a = await engine.submit(discord_user("1"), make_request("a"), ORIGIN)
    b = await engine.submit(discord_user("2"), make_request("b"), ORIGIN)
    assert b.position() == 2
    engine.resume()
    await b.wait()
    queued = [e.position for e in b.events_so_far if isinstance(e, Queued)]
    assert queued == [2, 1]
    # a's image is saved beside b's GPU work (issue 10 item 4), so a may end just after b
    assert await a.wait() is JobStatus.FINISHED


async def test_cancel_queued_job_owner_admin_and_stranger(engine_factory, config):
    config.access.discord_admins = ["boss"]
    engine = await engine_factory()
    engine.pause()
    job = await engine.submit(discord_user("1"), make_request(), ORIGIN)
    other = await engine.submit(discord_user("1"), make_request("other"), ORIGIN)
    with pytest.raises(JobNotFound):
        await engine.cancel(job.id, discord_user("2"))
    assert await job.cancel() is True
    assert isinstance(job.events_so_far[-1], Cancelled) and job.status is JobStatus.CANCELLED
    assert other.position() == 1
    assert await engine.cancel(other.id, discord_user("boss")) is True
    assert other.events_so_far[-1] == Cancelled(by_owner=False)
    assert (await engine.job_record(job.id)).status == "cancelled"


async def test_cancel_running_job_stops_at_next_step(engine_factory, backend):
    backend.gate = threading.Event()
    engine = await engine_factory()
    job = await engine.submit(discord_user("1"), make_request(steps=10), ORIGIN)
    while job.status is not JobStatus.RUNNING:
        await asyncio.sleep(0.001)
    assert await job.cancel() is True
    backend.gate.set()
    assert await job.wait() is JobStatus.CANCELLED
    assert not [e for e in job.events_so_far if isinstance(e, Progress)]
    nxt = await engine.submit(discord_user("1"), make_request("after"), ORIGIN)
    assert await nxt.wait() is JobStatus.FINISHED


async def test_queue_caps_per_user_and_total(engine_factory, config):
    config.engine.max_queue_per_user = 2
    config.engine.max_queue_total = 3
    engine = await engine_factory()
    engine.pause()
    for _ in range(2):
        await engine.submit(discord_user("1"), make_request(), ORIGIN)
    with pytest.raises(QueueFull, match="most is 2"):
        await engine.submit(discord_user("1"), make_request(), ORIGIN)
    await engine.submit(discord_user("2"), make_request(), ORIGIN)
    with pytest.raises(QueueFull, match="queue is full"):
        await engine.submit(discord_user("3"), make_request(), ORIGIN)


async def test_rate_limit_with_injected_clock(engine_factory, config, clock):
    config.rate_limit.images_per_window = 2
    config.access.discord_admins = ["boss"]
    engine = await engine_factory()
    for _ in range(2):
        await (await engine.submit(discord_user("1"), make_request(), ORIGIN)).wait()
    with pytest.raises(RateLimited) as refused:
        await engine.submit(discord_user("1"), make_request(), ORIGIN)
    assert refused.value.retry_at == pytest.approx(clock.now + 3600)
    for _ in range(3):  # admins are exempt
        await (await engine.submit(discord_user("boss"), make_request(), ORIGIN)).wait()
    clock.advance(3601)
    job = await engine.submit(discord_user("1"), make_request(), ORIGIN)
    assert await job.wait() is JobStatus.FINISHED


async def test_banned_word_is_refused(engine_factory, config):
    config.access.banned_words = ["forbidden"]
    engine = await engine_factory()
    with pytest.raises(AccessDenied):
        await engine.submit(discord_user("1"), make_request("a FORBIDDEN thing"), ORIGIN)
    assert engine.queued_count() == 0


class OutOfMemoryError(RuntimeError):
    """Same name as torch.cuda.OutOfMemoryError, which the engine recognises by name."""


async def test_out_of_memory_retries_once_under_a_tighter_plan(engine_factory, backend):
    backend.fail_with["big"] = [OutOfMemoryError("CUDA out of memory")]
    engine = await engine_factory()
    job = await engine.submit(discord_user("1"), make_request("big"), ORIGIN)
    assert await job.wait() is JobStatus.FINISHED
    assert backend.reduced == 1


async def test_out_of_memory_twice_fails_that_job_alone(engine_factory, backend):
    backend.fail_with["big"] = [OutOfMemoryError("oom"), OutOfMemoryError("oom again")]
    backend.fail_with["boom"] = [ValueError("secret internals")]
    engine = await engine_factory()
    engine.pause()
    big = await engine.submit(discord_user("1"), make_request("big"), ORIGIN)
    boom = await engine.submit(discord_user("2"), make_request("boom"), ORIGIN)
    fine = await engine.submit(discord_user("3"), make_request("fine"), ORIGIN)
    engine.resume()
    assert await fine.wait() is JobStatus.FINISHED
    assert isinstance(big.events_so_far[-1], Failed)
    assert "ran out of memory" in big.events_so_far[-1].reason
    reason = boom.events_so_far[-1].reason
    assert boom.id in reason and "secret internals" not in reason
    health = engine.health()
    assert health.failed == 2 and health.finished == 1 and "secret internals" in health.last_error
    quota = await engine.quota(discord_user("1"))
    assert quota.used == 0  # engine failures are refunded


async def test_job_timeout_fails_the_job(engine_factory, config, backend):
    config.engine.job_timeout_s = 0.05
    backend.step_seconds = 0.03
    engine = await engine_factory()
    job = await engine.submit(discord_user("1"), make_request(steps=50), ORIGIN)
    assert await job.wait() is JobStatus.FAILED
    assert "took too long" in job.error


async def test_a_renamed_user_is_still_the_same_user(engine_factory, config):
    from engine.request import User

    config.engine.max_queue_per_user = 1
    engine = await engine_factory()
    engine.pause()
    job = await engine.submit(User("telegram", "5", "old name"), make_request(), ORIGIN)
    with pytest.raises(QueueFull):
        await engine.submit(User("telegram", "5", "new name"), make_request(), ORIGIN)
    assert engine.jobs_of(User("telegram", "5", "new name")) == [job]
    assert await engine.cancel(job.id, User("telegram", "5", "newer")) is True


async def test_finished_jobs_do_not_pile_up_in_memory(engine_factory):
    from engine.engine import KEEP_FINISHED_JOBS

    engine = await engine_factory()
    delivered = await engine.submit(discord_user("0"), make_request(), ORIGIN)
    await delivered.wait()
    await engine.mark_delivered(delivered, "discord:channel/1/message/1")
    assert engine.get_job(delivered.id) is None  # delivered: only the journal keeps it
    assert (await engine.job_record(delivered.id)).status == "finished"
    undelivered = []
    for i in range(KEEP_FINISHED_JOBS + 5):
        job = await engine.submit(discord_user(str(i % 40)), make_request(), ORIGIN)
        await job.wait()
        undelivered.append(job)
    kept = [j for j in undelivered if engine.get_job(j.id) is not None]
    assert kept == undelivered[-KEEP_FINISHED_JOBS:]


async def test_the_local_console_is_exempt_and_its_quota_says_so(engine_factory, config):
    from engine.request import User

    config.rate_limit.images_per_window = 1
    engine = await engine_factory()
    console = User("console", "local")
    for _ in range(2):
        await (await engine.submit(console, make_request(), ORIGIN)).wait()
    quota = await engine.quota(console)
    assert quota.limit is None and quota.used == 2
