"""Several GPUs through NATS JetStream (engine/cluster/): a real nats-server, workers as
processes on the dry-run backend, the bot's engine in this process with a ``RemoteWorker``."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="the cluster needs nats-py (the test extra)")

from engine.backends.dry_run import DryRunBackend  # noqa: E402
from engine.cluster.dispatch import NoLocalBackend, RemoteWorker  # noqa: E402
from engine.cluster.messages import FINISHED, Outcome, WorkerInfo  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.job import Cancelled, Finished, JobStatus, Progress  # noqa: E402
from engine.png import encode_png  # noqa: E402
from engine.request import Origin, User  # noqa: E402
from tests.cluster_fixtures import (  # noqa: E402
    NatsServer,
    Workers,
    cluster_config,
    eventually,
    nats_server_binary,
)
from tests.conftest import make_request  # noqa: E402

ORIGIN = Origin("discord", chat_id="100")


def user(n: int) -> User:
    return User("discord", str(n), f"user {n}")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(nats_server_binary(), tmp_path / "jetstream")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def cfg(tmp_path: Path, nats_server: NatsServer) -> Config:
    return cluster_config(tmp_path, nats_server.url)


@pytest.fixture
def workers(cfg: Config, tmp_path: Path) -> Iterator[Workers]:
    group = Workers(cfg, tmp_path)
    yield group
    group.stop_all()


@pytest.fixture
async def bots(cfg: Config) -> AsyncIterator[list[Engine]]:
    """Bot engines opened by a test (``open_bot``), closed at its end unless they 'died'."""
    opened: list[Engine] = []
    yield opened
    for engine in opened:
        if engine._scheduler is not None:
            await engine.shutdown(grace_s=1)


async def open_bot(cfg: Config, bots: list[Engine], workers: int) -> Engine:
    engine = Engine(cfg, NoLocalBackend(), worker=RemoteWorker(cfg.cluster))  # type: ignore[arg-type]
    await engine.__aenter__()
    bots.append(engine)
    await eventually(lambda: len(remote(engine).workers()) >= workers, what="workers seen")
    return engine


def remote(engine: Engine) -> RemoteWorker:
    worker = engine._worker
    assert isinstance(worker, RemoteWorker)
    return worker


def local_png(request) -> bytes:  # type: ignore[no-untyped-def]
    """What a single-GPU bot makes for this request: the same seed gives the same image."""
    [image] = DryRunBackend().generate(request, lambda step, total: None)
    return encode_png(image, request.one(0), DryRunBackend.model_name)


async def test_jobs_run_on_several_workers_in_the_fair_order(cfg, workers, bots) -> None:
    workers.start("w1")
    workers.start("w2")
    engine = await open_bot(cfg, bots, workers=2)
    engine.pause()  # all in line first: then the start order is the fair queue's alone
    jobs = [await engine.submit(user(who), make_request(f"p{n}", seed=n), ORIGIN)
            for n, who in enumerate((0, 0, 0, 1, 2))]
    engine.resume()
    most_running = 0
    while not all(job.status.is_terminal for job in jobs):
        most_running = max(most_running, len(engine._runs))
        await asyncio.sleep(0.01)
    assert most_running == 2  # one job per worker with room, never more
    for job in jobs:
        assert job.status is JobStatus.FINISHED, job.error
        assert any(isinstance(e, Progress) for e in job.events_so_far)  # streamed back per step
        result = await job.result()
        assert result.png == local_png(job.request)
        assert Path(result.path).read_bytes() == result.png
    started = sorted(jobs, key=lambda j: j.started_monotonic or 0)
    # round-robin across users over the workers: user 0's second and third come last
    assert [j.user.user_id for j in started] == ["0", "1", "2", "0", "0"]
    def done() -> dict[str, int]:  # the workers' heartbeats, as /status shows them
        return {w.name: w.jobs_done for w in remote(engine).workers()}

    await eventually(lambda: sum(done().values()) == len(jobs), what="heartbeats' counts")
    assert all(done().values()), done()  # both workers took jobs


async def running_on(engine: Engine, job_id: str) -> str:
    """The worker whose heartbeat says it runs ``job_id``."""
    found: list[str] = []

    def look() -> bool:
        found[:] = [w.name for w in remote(engine).workers() if w.running == job_id]
        return bool(found)

    await eventually(look, what=f"a worker running {job_id}")
    return found[0]


async def test_a_worker_killed_mid_job_lets_another_run_it_delivered_once(
        tmp_path, nats_server, workers, bots) -> None:
    cfg = cluster_config(tmp_path, nats_server.url, step_s=0.2)
    workers.cfg = cfg
    workers.start("w1")
    workers.start("w2")
    engine = await open_bot(cfg, bots, workers=2)
    job = await engine.submit(user(1), make_request("a fox", seed=11, steps=10), ORIGIN)
    await eventually(lambda: any(isinstance(e, Progress) for e in job.events_so_far))
    victim = await running_on(engine, job.id)
    workers.kill(victim)
    assert await asyncio.wait_for(job.wait(), 30) is JobStatus.FINISHED
    assert sum(isinstance(e, Finished) for e in job.events_so_far) == 1
    result = await job.result()
    assert result.png == local_png(job.request)  # same seed on the other worker, same image
    survivor = ({"w1", "w2"} - {victim}).pop()
    assert f"job {job.id} finished" in workers.log(survivor)  # the bot moved it there
    record = await engine.store.get_job(job.id)
    assert record is not None and record.status == "finished"
    # the dead worker's heartbeat expires
    await eventually(lambda: [w.name for w in remote(engine).workers()] == [survivor])
    rw = remote(engine)  # room for one job, not two
    assert rw.claim("x1", job.request, 0) and not rw.claim("x2", job.request, 1)
    rw.release("x1")


async def test_cancel_reaches_a_running_remote_job_between_steps(tmp_path, nats_server,
                                                                 workers, bots) -> None:
    cfg = cluster_config(tmp_path, nats_server.url, step_s=0.2)
    workers.cfg = cfg
    workers.start("w1")
    engine = await open_bot(cfg, bots, workers=1)
    job = await engine.submit(user(1), make_request("slow", steps=50), ORIGIN)
    await eventually(lambda: any(isinstance(e, Progress) for e in job.events_so_far))
    assert await job.cancel()
    assert await asyncio.wait_for(job.wait(), 5) is JobStatus.CANCELLED
    assert isinstance(job.events_so_far[-1], Cancelled)
    await eventually(lambda: f"job {job.id} cancelled" in workers.log("w1"), timeout=5,
                     what="the worker stopping the job")
    follow = await engine.submit(user(1), make_request("next", steps=2), ORIGIN)
    assert await asyncio.wait_for(follow.wait(), 10) is JobStatus.FINISHED  # worker free again


async def test_a_cancel_asked_for_while_the_connection_is_closed_is_sent_when_it_is_back(
        tmp_path, nats_server, workers, bots) -> None:
    """The server closed the bot's connection for good (as when its credentials expire) while
    a worker makes a long image, and the user cancels: the cancel is kept and sent when the bot
    connects again, so the worker stops instead of finishing an image nobody will get."""
    cfg = cluster_config(tmp_path, nats_server.url, step_s=0.2)
    workers.cfg = cfg
    workers.start("w1")
    engine = await open_bot(cfg, bots, workers=1)
    job = await engine.submit(user(1), make_request("slow", steps=60), ORIGIN)  # 12 s
    await eventually(lambda: any(isinstance(e, Progress) for e in job.events_so_far))
    await remote(engine)._nc.close()
    assert await job.cancel()
    assert await asyncio.wait_for(job.wait(), 5) is JobStatus.CANCELLED
    await eventually(lambda: f"job {job.id} cancelled" in workers.log("w1"), timeout=8,
                     what="the worker stopping the job once the bot is connected again")
    assert f"job {job.id} finished" not in workers.log("w1")
    # the new connection lists the workers again from their heartbeats (a busy machine can
    # let one lapse for a moment, and then no worker is listed)
    await eventually(lambda: len(remote(engine).workers()) == 1, timeout=10,
                     what="the worker listed again")
    follow = await engine.submit(user(1), make_request("next", steps=2), ORIGIN)
    assert await asyncio.wait_for(follow.wait(), 10) is JobStatus.FINISHED


async def die(engine: Engine) -> None:
    """The bot process dies: nothing more reaches its journal or the server from it."""
    assert engine._scheduler is not None
    engine._scheduler.cancel()
    await asyncio.gather(engine._scheduler, return_exceptions=True)
    engine._scheduler = None
    await remote(engine).close()
    await engine.store.__aexit__(None, None, None)


async def test_the_bot_killed_while_a_worker_finishes_gets_the_image_after_its_restart(
        tmp_path, nats_server, workers, bots) -> None:
    cfg = cluster_config(tmp_path, nats_server.url, step_s=0.1)
    workers.cfg = cfg
    workers.start("w1")
    engine = await open_bot(cfg, bots, workers=1)
    job = await engine.submit(user(1), make_request("a heron", seed=5, steps=10), ORIGIN)
    await eventually(lambda: any(isinstance(e, Progress) for e in job.events_so_far))
    await die(engine)
    await eventually(lambda: f"job {job.id} finished" in workers.log("w1"), timeout=10,
                     what="the worker finishing without the bot")
    again = await open_bot(cfg, bots, workers=1)
    [recovered] = again.recovered_jobs("discord")
    assert recovered.id == job.id
    assert await asyncio.wait_for(recovered.wait(), 10) is JobStatus.FINISHED
    assert (await recovered.result()).png == local_png(job.request)
    await asyncio.sleep(1.0)  # nothing runs it a second time
    assert workers.log("w1").count(f"job {job.id} finished") == 1
    assert [w.jobs_done for w in remote(again).workers()] == [1]


async def test_a_nats_restart_loses_no_accepted_job(tmp_path, nats_server, workers,
                                                    bots) -> None:
    cfg = cluster_config(tmp_path, nats_server.url, step_s=0.1)
    workers.cfg = cfg
    workers.start("w1")
    workers.start("w2")
    engine = await open_bot(cfg, bots, workers=2)
    jobs = [await engine.submit(user(n), make_request(f"p{n}", seed=n, steps=6), ORIGIN)
            for n in range(4)]
    await eventually(lambda: any(isinstance(e, Progress) for e in jobs[0].events_so_far))
    nats_server.restart()  # file storage: the streams, the lease and the buckets come back
    for job in jobs:
        assert await asyncio.wait_for(job.wait(), 45) is JobStatus.FINISHED, job.error
        assert sum(isinstance(e, Finished) for e in job.events_so_far) == 1
        assert (await job.result()).png == local_png(job.request)


async def test_an_outcome_arriving_twice_is_taken_once(cfg, bots) -> None:
    """A fake worker answers the same job twice (as two workers would after a lease lapsed)."""
    import nats

    nc = await nats.connect(cfg.cluster.url)
    js = nc.jetstream()
    engine = Engine(cfg, NoLocalBackend(), worker=RemoteWorker(cfg.cluster))  # type: ignore[arg-type]
    await engine.__aenter__()
    bots.append(engine)
    rw = remote(engine)
    info = WorkerInfo("fake", "none", "dry-run placeholder", 1 << 20, 4)
    await rw._kv.put("fake", info.to_bytes())
    await eventually(lambda: len(rw.workers()) == 1)
    sub = await js.pull_subscribe(rw.names.jobs_for("fake"), durable="fake",
                                  stream=rw.names.jobs_stream)
    job = await engine.submit(user(1), make_request("twice", seed=3), ORIGIN)
    [msg] = await sub.fetch(1, timeout=10)
    png = local_png(job.request)
    await rw._images.put(rw.names.image(job.id, 0), png)
    outcome = Outcome(job.id, FINISHED, images=1, worker="fake").to_bytes()
    for n in range(2):  # different message ids: the server keeps both, the bot takes one
        await js.publish(rw.names.result(job.id), outcome, headers={"Nats-Msg-Id": f"x{n}"})
    await msg.ack()
    assert await asyncio.wait_for(job.wait(), 10) is JobStatus.FINISHED
    await asyncio.sleep(0.5)
    assert sum(isinstance(e, Finished) for e in job.events_so_far) == 1
    assert list(Path(cfg.engine.output_dir).rglob("*.png")) == [Path(job.result_now.path)]
    await nc.close()


async def test_a_job_no_worker_finishes_goes_to_the_dead_letters_and_fails(cfg, bots) -> None:
    """A worker that takes the job and never answers, every time: after max_deliver leases
    the server's advisory reaches the bot, which fails the job (refunded: the bot's fault)."""
    import nats

    nc = await nats.connect(cfg.cluster.url)
    js = nc.jetstream()
    engine = Engine(cfg, NoLocalBackend(), worker=RemoteWorker(cfg.cluster))  # type: ignore[arg-type]
    await engine.__aenter__()
    bots.append(engine)
    rw = remote(engine)
    await rw._kv.put("silent", WorkerInfo("silent", "none", "x", 1 << 20, 4).to_bytes())
    await eventually(lambda: len(rw.workers()) == 1)
    from nats.js.api import ConsumerConfig

    sub = await js.pull_subscribe(rw.names.jobs_for("silent"), durable="worker-silent",
                                  stream=rw.names.jobs_stream,
                                  config=ConsumerConfig(ack_wait=0.5, max_deliver=2))
    job = await engine.submit(user(1), make_request("poison"), ORIGIN)
    taken = collections.Counter()
    for _ in range(2):
        [msg] = await sub.fetch(1, timeout=10)
        taken[msg.data] += 1  # and never acked
    assert len(taken) == 1
    with pytest.raises(nats.errors.TimeoutError):  # the workers keep asking: nothing more
        await sub.fetch(1, timeout=2)
    assert await asyncio.wait_for(job.wait(), 15) is JobStatus.FAILED
    assert "kept stopping" in (job.error or "")
    await nc.close()
