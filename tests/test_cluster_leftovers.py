"""A job's objects on the server (its PNGs, an image-to-image job's picture) go once the bot has
journalled the job: after ``Leftovers.keep_s``, or at the bot's clean shutdown; a worker whose
job's picture is gone fails that job instead of waiting for it. A real nats-server and worker
processes on the dry-run backend (engine/cluster/leftovers.py, dispatch.py, worker.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.cluster.leftovers import Leftover, Leftovers

pytest.importorskip("nats", reason="the cluster needs nats-py (the test extra)")

from engine.cluster.messages import FAILED, Outcome, WorkItem  # noqa: E402
from engine.cluster.names import Names  # noqa: E402
from engine.job import JobStatus  # noqa: E402
from tests import test_cluster  # noqa: E402
from tests.cluster_fixtures import eventually  # noqa: E402
from tests.conftest import make_request  # noqa: E402
from tests.test_cluster import ORIGIN, open_bot, remote, user  # noqa: E402

# the cluster tests' fixtures (a nats-server, worker processes, bot engines closed at the end)
nats_server, cfg, workers, bots = (test_cluster.nats_server, test_cluster.cfg,
                                   test_cluster.workers, test_cluster.bots)


def test_leftovers_fall_due_keep_s_after_they_were_noted() -> None:
    left = Leftovers(keep_s=10.0)
    left.note("a", 2, False, now=100.0)
    left.note("b", 0, True, now=105.0)
    left.note("c", 0, False, now=105.0)  # nothing stored: nothing to delete
    assert len(left) == 2
    assert left.due(109.9) == []
    assert left.due(110.0) == [Leftover("a", 2, False, 110.0)]
    assert left.all() == [Leftover("b", 0, True, 115.0)]  # a clean shutdown: due or not
    assert len(left) == 0 and left.due(1e9) == []


async def stored(cfg) -> set[str]:  # type: ignore[no-untyped-def]
    """The objects in the images bucket now (deleted ones left out), through a client of its
    own: also after the bot closed its connection."""
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(cfg.cluster.url)
    try:
        images = await nc.jetstream().object_store(Names(cfg.cluster.name).images_bucket)
        try:
            return {info.name for info in await images.list(ignore_deletes=True)}
        except NotFoundError:  # none at all
            return set()
    finally:
        await nc.close()


def picture(tmp_path: Path) -> str:
    from PIL import Image

    path = tmp_path / "start.png"
    Image.new("RGB", (256, 256), (200, 40, 40)).save(path)
    return str(path)


async def test_a_finished_jobs_objects_go_after_the_journal_has_it(cfg, workers, bots,
                                                                   tmp_path) -> None:
    workers.start("w1")
    engine = await open_bot(cfg, bots, workers=1)
    remote(engine)._leftovers.keep_s = 2.0
    text = await engine.submit(user(1), make_request("a fox", seed=1).with_changes(count=2),
                               ORIGIN)
    vary = await engine.submit(user(2), make_request("a fox", seed=2).with_changes(
        init_image=picture(tmp_path), strength=0.5), ORIGIN)
    for job in (text, vary):
        assert await asyncio.wait_for(job.wait(), 20) is JobStatus.FINISHED, job.error
    # taken, not yet deleted: a bot killed now would still find them after its restart
    assert {f"{text.id}.0", f"{text.id}.1", f"{vary.id}.0", f"{vary.id}.input"} <= \
        await stored(cfg)
    for job in (text, vary):
        record = await engine.store.get_job(job.id)
        assert record is not None and record.status == "finished"
    deadline = asyncio.get_running_loop().time() + 10
    objects = await stored(cfg)
    while objects and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
        objects = await stored(cfg)
    assert objects == set()  # PNGs and the input picture: nothing a later fetch would want
    assert len(remote(engine)._leftovers) == 0
    saved = (await text.result()).images  # they came back before they went
    assert len(saved) == 2 and all(Path(str(image.path)).exists() for image in saved)
    assert (await vary.result()).png == Path(str((await vary.result()).path)).read_bytes()


async def test_a_clean_shutdown_deletes_what_it_took_at_once(cfg, workers, bots) -> None:
    workers.start("w1")
    engine = await open_bot(cfg, bots, workers=1)  # the default keep_s: a minute
    job = await engine.submit(user(1), make_request("a heron", seed=4), ORIGIN)
    assert await asyncio.wait_for(job.wait(), 20) is JobStatus.FINISHED, job.error
    assert f"{job.id}.0" in await stored(cfg)
    await engine.shutdown(grace_s=1)
    assert await stored(cfg) == set()


async def test_a_worker_fails_a_job_whose_picture_is_gone(cfg, workers) -> None:
    """Its picture deleted (the bot gave the job up) or expired: a sentence, not a worker
    waiting for ever."""
    import nats

    workers.start("w1")
    names = Names(cfg.cluster.name)
    nc = await nats.connect(cfg.cluster.url)
    js = nc.jetstream()
    kv = None
    while kv is None:  # the worker creates the streams and buckets as it starts
        try:
            kv = await js.key_value(names.workers_bucket)
            await kv.get("w1")
        except Exception:
            kv = None
            await asyncio.sleep(0.1)
    request = make_request("gone").with_changes(init_image="/nowhere/start.png", strength=0.5)
    item = WorkItem("gone1", request, input_object=names.input_image("gone1"))
    await js.publish(names.jobs_for("w1"), item.to_bytes())
    found: list[Outcome] = []

    async def outcome() -> None:
        try:
            raw = await js.get_last_msg(names.results_stream, names.result("gone1"))
        except Exception:
            return
        found.append(Outcome.from_bytes(raw.data))

    deadline = asyncio.get_running_loop().time() + 20
    while not found and asyncio.get_running_loop().time() < deadline:
        await outcome()
        await asyncio.sleep(0.2)
    await nc.close()
    assert found, "no outcome: the worker is still waiting for the picture"
    assert found[0].status == FAILED and "no longer there" in found[0].error
    await eventually(lambda: "job gone1 failed" in workers.log("w1"), timeout=5)
