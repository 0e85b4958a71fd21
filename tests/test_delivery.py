"""Delivering a result: retries with backoff, then journaled as undelivered or given up."""

from __future__ import annotations

from bot.delivery import RetryPolicy, deliver
from engine.config import DeliverySection
from tests.conftest import ORIGIN, discord_user, make_request

FAST = RetryPolicy(attempts=3, first_delay_s=0.001, max_delay_s=0.002, give_up_after_s=100)


async def finished_job(engine):
    job = await engine.submit(discord_user("1"), make_request(), ORIGIN)
    await job.wait()
    return job


async def test_retries_then_delivers(engine_factory):
    engine = await engine_factory()
    job = await finished_job(engine)
    calls = []

    async def send() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("502 Bad Gateway")
        return "discord:channel/1/message/9"

    assert await deliver(engine, job, send, policy=FAST) is True
    record = await engine.job_record(job.id)
    assert len(calls) == 3 and record.delivered_to == "discord:channel/1/message/9"
    assert record.delivery_attempts == 3


async def test_permanent_error_stops_at_once_and_stays_undelivered(engine_factory, clock):
    engine = await engine_factory()
    job = await finished_job(engine)
    calls = []

    async def send() -> str:
        calls.append(1)
        raise PermissionError("bot was removed from the chat")

    ok = await deliver(engine, job, send, policy=FAST, is_permanent=lambda e: True)
    record = await engine.job_record(job.id)
    assert not ok and len(calls) == 1
    assert record.delivered_at is None and "removed" in record.last_delivery_error
    assert not record.delivery_given_up
    clock.advance(101)  # older than give_up_after_s: the next failure gives up for good
    assert not await deliver(engine, job, send, policy=FAST, is_permanent=lambda e: True)
    assert (await engine.job_record(job.id)).delivery_given_up


def test_backoff_doubles_up_to_the_cap():
    policy = RetryPolicy.from_config(DeliverySection(first_delay_s=2, max_delay_s=10))
    assert [policy.delay(n) for n in range(1, 6)] == [2, 4, 8, 10, 10]


async def test_retries_go_on_in_the_background_while_the_bot_runs(engine_factory):
    """Issue 11 row 3: after the quick attempts the result was retried only at the next
    start, while the user was told "the bot will try again later"."""
    engine = await engine_factory()
    job = await finished_job(engine)
    calls, told = [], []

    async def send() -> str:
        calls.append(1)
        if len(calls) < 8:  # an outage longer than the quick attempts
            raise ConnectionError("502 Bad Gateway")
        return "discord:channel/1/message/9"

    async def tell() -> None:
        told.append(len(calls))

    assert await deliver(engine, job, send, policy=FAST, on_delay=tell) is True
    assert told == [FAST.attempts]  # told once, when the quick attempts were used up
    record = await engine.job_record(job.id)
    assert record.delivery_attempts == 8 and record.delivered_to


async def test_the_background_retries_give_up_when_the_job_is_too_old(engine_factory, clock):
    engine = await engine_factory()
    job = await finished_job(engine)
    calls = []

    async def send() -> str:
        calls.append(1)
        clock.advance(30)  # each failing try takes the job 30 s further from its start
        raise ConnectionError("502 Bad Gateway")

    assert await deliver(engine, job, send, policy=FAST) is False
    record = await engine.job_record(job.id)
    assert record.delivery_given_up and len(calls) == 4  # 120 s > give_up_after_s = 100
    assert [r.job_id for r in await engine.store.undelivered_jobs()] == []
