"""Jobs go only to workers that can run them (largest pixels, batch, styles), a job no worker
online can run is refused at submit, and /status and doctor list the workers: a real
nats-server and worker processes with their own [limits] and [styles] (dry-run backend)."""

from __future__ import annotations

import asyncio
import io
import time

import pytest

pytest.importorskip("nats", reason="the cluster needs nats-py (the test extra)")

from bot import render  # noqa: E402
from bot.console import ConsoleAdapter  # noqa: E402
from bot.doctor import run_doctor  # noqa: E402
from engine.config import Config, StyleSection  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.errors import NoWorkerCanRun  # noqa: E402
from engine.job import JobStatus  # noqa: E402
from tests import test_cluster  # noqa: E402
from tests.cluster_fixtures import cluster_config, eventually, free_port  # noqa: E402
from tests.conftest import make_request  # noqa: E402
from tests.test_cluster import ORIGIN, open_bot, remote, running_on, user  # noqa: E402

# the cluster tests' fixtures (a nats-server, worker processes, bot engines closed at the end)
nats_server, workers, bots = test_cluster.nats_server, test_cluster.workers, test_cluster.bots

SMALL = """
[limits]
max_pixels = 1048576
images_max = 1

[styles.anime]
file = "anime.safetensors"
"""
BIG = """
[limits]
max_pixels = 4194304
images_max = 4
"""


@pytest.fixture
def cfg(tmp_path, nats_server) -> Config:  # the bot allows what the big card runs
    config = cluster_config(tmp_path, nats_server.url, step_s=0.1)
    config.limits.max_pixels = 4194304
    config.styles = {"anime": StyleSection(file="anime.safetensors"),
                     "pixel": StyleSection(file="pixel.safetensors")}
    return config


def worker_running(engine: Engine, name: str) -> str:
    return next(w.running for w in remote(engine).workers() if w.name == name)


async def test_a_big_job_waits_for_the_big_worker_while_small_jobs_use_the_small_one(
        cfg, workers, bots) -> None:
    workers.start("small", SMALL)
    workers.start("big", BIG)
    engine = await open_bot(cfg, bots, workers=2)
    grid = make_request("a grid", seed=1, steps=30).with_changes(count=4)
    first = await engine.submit(user(1), grid, ORIGIN)
    assert await running_on(engine, first.id) == "big"
    second = await engine.submit(user(2), grid.with_changes(steps=2), ORIGIN)
    await asyncio.sleep(1.0)  # the small worker is idle, and still the grid waits for the big
    assert second.status is JobStatus.QUEUED
    assert worker_running(engine, "small") == ""
    single = await engine.submit(user(3), make_request("one", steps=2), ORIGIN)
    styled = await engine.submit(user(4), make_request("anime", steps=2).with_changes(
        style="anime"), ORIGIN)
    for job in (single, styled):  # they go ahead on the small card; the grid keeps waiting
        assert await asyncio.wait_for(job.wait(), 10) is JobStatus.FINISHED, job.error
    assert second.status is JobStatus.QUEUED and first.status is JobStatus.RUNNING
    for job in (first, second):
        assert await asyncio.wait_for(job.wait(), 20) is JobStatus.FINISHED, job.error
    small, big = workers.log("small"), workers.log("big")
    for job in (first, second):
        assert f"job {job.id} finished" in big and job.id not in small
    for job in (single, styled):  # the best fit: the big card stayed free for grids
        assert f"job {job.id} finished" in small and job.id not in big


async def test_with_only_small_workers_a_big_job_is_refused_at_submit(cfg, workers,
                                                                      bots) -> None:
    workers.start("small", SMALL)
    engine = await open_bot(cfg, bots, workers=1)
    refused = {
        "2048×2048 image: the largest they make is 1,048,576 pixels (about 1024×1024)":
            make_request("huge", width=2048, height=2048),
        "4 images at once": make_request("grid").with_changes(count=4),
        "the style 'pixel'": make_request("pixel").with_changes(style="pixel"),
    }
    for said, request in refused.items():
        with pytest.raises(NoWorkerCanRun) as caught:
            await engine.submit(user(1), request, ORIGIN)
        assert said in str(caught.value) and "Please" in str(caught.value)
    assert engine.queued_count() == 0 and await engine.store.unfinished_jobs() == []
    job = await engine.submit(user(1), make_request("fits", steps=2), ORIGIN)
    assert await asyncio.wait_for(job.wait(), 10) is JobStatus.FINISHED


async def test_status_and_doctor_list_the_workers(cfg, workers, bots) -> None:
    workers.start("small", SMALL)
    workers.start("big", BIG)
    engine = await open_bot(cfg, bots, workers=2)
    job = await engine.submit(user(1), make_request("one", steps=2), ORIGIN)
    assert await asyncio.wait_for(job.wait(), 10) is JobStatus.FINISHED
    await eventually(lambda: sum(w.jobs_done for w in remote(engine).workers()) == 1)
    out = io.StringIO()
    await ConsoleAdapter(engine, stdin=io.StringIO(), stdout=out).handle_line("/status")
    text = out.getvalue()
    assert "Workers: 2" in text
    assert "• big — dry-run (no GPU): largest 2048×2048, 4 at once, styles: none; 0 done" in text
    assert ("• small — dry-run (no GPU): largest 1024×1024, 1 at once, styles: anime; 1 done, "
            "idle, seen") in text
    group = render.status(engine.health(), private=False)  # issue 11 row 12: no host names
    assert "worker 1 — dry-run" in group and "small" not in group and "big" not in group

    lines: list[str] = []
    code = await asyncio.to_thread(run_doctor, cfg, None, print_fn=lines.append)
    shown = "\n".join(lines)
    assert code == 0, shown
    assert f"[ok ] cluster: NATS server {cfg.cluster.url} reachable, JetStream on" in shown
    assert "[ok ] workers: 2 online" in shown
    assert "[ok ] worker: big — dry-run (no GPU): largest 2048×2048" in shown
    assert "[ok ] worker: small — dry-run (no GPU): largest 1024×1024" in shown


def test_doctor_says_when_the_nats_server_is_not_there(tmp_path) -> None:
    cfg = cluster_config(tmp_path, f"nats://127.0.0.1:{free_port()}")  # nobody listens
    lines: list[str] = []
    started = time.monotonic()
    assert run_doctor(cfg, None, print_fn=lines.append) == 1
    assert time.monotonic() - started < 10
    shown = "\n".join(lines)
    assert f"[FAIL] cluster: NATS server {cfg.cluster.url} not reachable" in shown
    assert "fix: start it (nats-server -js" in shown
