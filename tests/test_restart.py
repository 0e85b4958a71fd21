"""Nothing accepted is lost across a restart: queued and running jobs come back in order."""

from __future__ import annotations

import asyncio
import threading

from engine.engine import Engine
from engine.job import Finished, JobStatus
from tests.conftest import ORIGIN, RecordingBackend, discord_user, make_request


async def test_queued_and_running_jobs_are_requeued_in_original_order(config, clock):
    first = RecordingBackend()
    first.gate = threading.Event()  # the first job never gets past its start
    engine = Engine(config, first, clock=clock)
    await engine.__aenter__()
    running = await engine.submit(discord_user("1"), make_request("running"), ORIGIN)
    while running.status is not JobStatus.RUNNING:
        await asyncio.sleep(0.001)
    queued = [await engine.submit(discord_user(u), make_request(f"q{u}"), ORIGIN) for u in "234"]
    record = await engine.job_record(queued[0].id)
    assert record is not None and record.status == "queued"  # journaled before submit returned
    release = asyncio.get_running_loop().call_later(0.2, first.gate.set)
    await engine.shutdown(grace_s=0.05)  # the running job is aborted, not finished
    release.cancel()

    second = RecordingBackend()
    async with Engine(config, second, clock=clock) as restarted:
        recovered = restarted.recovered_jobs("discord")
        assert [j.id for j in recovered] == [running.id] + [j.id for j in queued]
        assert all(j.recovered for j in recovered)
        for job in recovered:
            assert await job.wait() is JobStatus.FINISHED
        assert [p for _, p in second.order] == ["running", "q2", "q3", "q4"]
        assert restarted.recovered_jobs("telegram") == []


async def test_finished_but_undelivered_result_is_offered_again(config, clock):
    async with Engine(config, RecordingBackend(), clock=clock) as engine:
        job = await engine.submit(discord_user("1"), make_request("keep me"), ORIGIN)
        await job.wait()
        await engine.mark_undelivered(job, "channel is gone")
        delivered = await engine.submit(discord_user("1"), make_request("sent"), ORIGIN)
        await delivered.wait()
        await engine.mark_delivered(delivered, "discord:channel/1/message/2")
    async with Engine(config, RecordingBackend(), clock=clock) as restarted:
        again = restarted.recovered_jobs("discord")
        assert [j.id for j in again] == [job.id]
        event = again[0].events_so_far[-1]
        assert isinstance(event, Finished) and event.result.png.startswith(b"\x89PNG")


async def test_a_recovered_job_keeps_the_language_it_was_asked_in(config, clock):
    """The adapters write the command's language into ``origin.extra`` (``bot.language``); the
    journal keeps it, so a job's status and result after a restart are said in it."""
    from bot import i18n, language
    from engine.request import Origin

    with i18n.using("zh"):
        origin = Origin("telegram", chat_id="44", message_id="7",
                        extra=language.remembered({"thread_id": 3}))
    assert origin.extra == {"thread_id": 3, "language": "zh"}
    async with Engine(config, RecordingBackend(), clock=clock) as engine:
        engine.pause()
        job = await engine.submit(discord_user("1"), make_request("狐狸"), origin)
    async with Engine(config, RecordingBackend(), clock=clock) as restarted:
        [again] = restarted.recovered_jobs("telegram")
        assert again.id == job.id and again.origin.extra == {"thread_id": 3, "language": "zh"}
        assert await language.choose_for_job(restarted, config, again) == "zh"
        assert i18n.current() == "zh"  # set for this task: its follower says everything in it
        await restarted.chat_languages.set("telegram:44", "en")  # the chat's own comes first
        assert await language.choose_for_job(restarted, config, again) == "en"
    i18n.use("en")
