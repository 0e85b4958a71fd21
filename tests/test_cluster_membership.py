"""Workers come and go while the bot's queue is full: one joins late and takes jobs queued
before it came, one leaves cleanly (SIGTERM: the job it runs first) and the other serves all
that follows. A real nats-server and worker processes on the dry-run backend; which worker ran
which job is read from the workers' own logs, and every job must have run to its end once."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

pytest.importorskip("nats", reason="the cluster needs nats-py (the test extra)")

from engine.config import Config  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.job import Finished, Job, JobStatus  # noqa: E402
from tests import test_cluster  # noqa: E402
from tests.cluster_fixtures import Workers, cluster_config, eventually  # noqa: E402
from tests.conftest import make_request  # noqa: E402
from tests.test_cluster import ORIGIN, local_png, open_bot, remote, running_on, user  # noqa: E402

# the cluster tests' fixtures (a nats-server, worker processes, bot engines closed at the end)
nats_server, workers, bots = test_cluster.nats_server, test_cluster.workers, test_cluster.bots

STEPS = 10  # 10 × 0.1 s: a job lasts about a second, so a queue of ten outlasts a start-up


@pytest.fixture
def cfg(tmp_path, nats_server) -> Config:
    return cluster_config(tmp_path, nats_server.url, step_s=0.1)


async def submit(engine: Engine, first: int, n: int) -> list[Job]:
    """``n`` jobs of ``n`` users (no per-user cap bites), seeds from ``first``."""
    return [await engine.submit(user(first + i), make_request(f"p{first + i}", seed=first + i,
                                                              steps=STEPS), ORIGIN)
            for i in range(n)]


async def finish(jobs: list[Job], timeout: float = 60.0) -> None:
    for job in jobs:
        assert await asyncio.wait_for(job.wait(), timeout) is JobStatus.FINISHED, job.error


def ran_on(workers: Workers, names: tuple[str, ...]) -> dict[str, str]:
    """Job id -> the worker that finished it; a job finished twice anywhere fails here."""
    finished = {name: workers.finished(name) for name in names}
    times = Counter(job for jobs in finished.values() for job in jobs)
    assert [job for job, n in times.items() if n > 1] == [], "a job ran to its end twice"
    return {job: name for name, jobs in finished.items() for job in jobs}


async def test_a_worker_joining_late_takes_queued_jobs_and_one_leaving_hands_over_the_rest(
        cfg, workers, bots) -> None:
    workers.start("a")
    engine = await open_bot(cfg, bots, workers=1)
    early = await submit(engine, 0, 10)  # only a runs: one at a time, the rest wait in line
    await running_on(engine, early[0].id)

    workers.start("b")  # joins late
    await eventually(lambda: len(remote(engine).workers()) == 2, what="b seen by the bot")
    waiting = [job for job in early if job.status is JobStatus.QUEUED]
    assert len(waiting) >= 4, "the queue ran dry before b came: make the jobs longer"
    a_before_b = len(workers.finished("a"))
    await finish(early)
    runner = ran_on(workers, ("a", "b"))
    assert {runner[job.id] for job in early} == {"a", "b"}
    assert any(runner[job.id] == "b" for job in waiting)  # b took jobs queued before it came
    assert len(workers.finished("a")) > a_before_b + 1  # and a kept serving beside it

    later = await submit(engine, 100, 6)
    its_job = later[0].id
    leaving = await running_on(engine, its_job)
    staying = ({"a", "b"} - {leaving}).pop()
    assert await asyncio.to_thread(workers.stop, leaving) == 0  # after the job it ran
    await eventually(lambda: [w.name for w in remote(engine).workers()] == [staying],
                     what=f"{leaving} gone from the bot's workers")
    after = await submit(engine, 200, 3)  # with only the other worker left
    await finish(later + after)

    runner = ran_on(workers, ("a", "b"))
    assert runner[its_job] == leaving  # the running job finished there, not run again
    gone = set(workers.finished(leaving))
    assert [job.id for job in after if job.id in gone] == []
    started_after_stop = [job for job in later if job.id not in gone]
    assert len(started_after_stop) >= 4
    assert all(runner[job.id] == staying for job in started_after_stop + after)

    for job in early + later + after:  # nothing lost, each delivered once, the same image
        assert sum(isinstance(e, Finished) for e in job.events_so_far) == 1
        assert (await job.result()).png == local_png(job.request)
        assert job.id in runner
    records = [await engine.store.get_job(job.id) for job in early + later + after]
    assert all(r is not None and r.status == "finished" for r in records)
