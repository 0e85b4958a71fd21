"""Issue 13: ``/stats`` from the journal (engine), and how it reads in private and in a group."""

from __future__ import annotations

import io

from bot import render
from bot.console import ConsoleAdapter
from engine.backends.dry_run import DryRunBackend
from engine.request import Origin, User
from tests.conftest import discord_user, make_request

ALICE = User("telegram", "42", "Alice")
BOB = User("telegram", "43", "Bob_the_builder")
GROUP = Origin("telegram", chat_id="-100")


async def test_stats_count_images_gpu_time_failures_waits_and_top_users(
        engine_factory, backend, clock):
    engine = await engine_factory()
    backend.fail_with["boom"] = [ValueError("secret internals")]
    old = await engine.submit(discord_user("9"), make_request("old"), Origin("discord"))
    await old.wait()
    clock.advance(2 * 86400)  # that one is out of the last day, still in the week
    jobs = [await engine.submit(ALICE, make_request("one").with_changes(count=2), GROUP),
            await engine.submit(ALICE, make_request("two"), GROUP),
            await engine.submit(BOB, make_request("three"), GROUP),
            await engine.submit(BOB, make_request("boom"), GROUP)]
    for job in jobs:
        await job.wait()
    clock.advance(60)

    stats = await engine.stats()
    day, week = stats.periods
    assert (day.label, day.images, day.jobs, day.failures) == ("the last day", 4, 4, 1)
    assert (week.images, week.jobs) == (5, 5)
    # ties go to whoever was seen first
    assert [u.name for u in week.top_users] == ["Alice", "user9", "Bob_the_builder"]
    assert day.gpu_s > 0 and day.per_image_p50_s is not None and day.wait_p50_s is not None
    assert [(u.name, u.images) for u in day.top_users] == [("Alice", 3), ("Bob_the_builder", 1)]
    assert day.top_users[0].key == "telegram:42"
    assert day.causes[0][1] == 1 and "…" in day.causes[0][0]  # the job id blanked

    private = render.stats(stats)
    assert "telegram:42" in private and "Something went wrong" in private
    in_group = render.stats(stats, private=False)
    assert "telegram:" not in in_group and "42" not in in_group.replace("4 images", "")
    assert "Alice 3" in in_group and "Something went wrong" not in in_group
    assert "causes are in a private /stats" in in_group


async def test_a_finished_job_journals_its_gpu_seconds_and_step_time(engine_factory):
    engine = await engine_factory(None, DryRunBackend(0.01))
    job = await engine.submit(ALICE, make_request(steps=4), GROUP)
    await job.wait()
    async with engine.store.db.execute(
            "SELECT gpu_s, step_s, cost, group_key FROM jobs WHERE job_id = ?",
            (job.id,)) as cursor:
        gpu_s, step_s, cost, group = await cursor.fetchone()
    assert gpu_s >= 0.03 and step_s is not None and step_s > 0
    assert cost == engine.rate_limiter.costs.cost(make_request(steps=4))  # 4 steps of 256²
    assert group == "telegram:-100"


async def test_the_console_answers_stats(engine_factory):
    engine = await engine_factory()
    out = io.StringIO()
    console = ConsoleAdapter(engine, stdin=io.StringIO(""), stdout=out)
    await (await console.imagine("a fox --steps 1")).wait()
    await console.handle_line("/stats")
    assert "📊 The last day: 1 image made (1 asked for)" in out.getvalue()
    assert "console:local" in out.getvalue()  # the console is private
