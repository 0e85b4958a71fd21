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
