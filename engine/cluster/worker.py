"""``python -m bot worker``: one process per GPU, running jobs it pulls from the cluster.

    async with ClusterWorker(config) as worker:
        await worker.serve(stop)

It runs the same backend (and memory plan) as a single-GPU bot, through the same ``GpuWorker``.
A job is acked only after its PNGs and its outcome are stored, so a worker that dies at any
point leaves the job to be run again (its lease lapses) or its outcome to be found.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from engine import result_files
from engine.backends import create_backend
from engine.cluster.messages import CANCELLED, FAILED, FINISHED, Outcome, WorkerInfo, WorkItem
from engine.cluster.names import CONSUMER_IDLE_S, Names, connect, ensure_streams, explain
from engine.cluster.tasks import cancel_until_done
from engine.config import Config
from engine.errors import N_, EngineError
from engine.request import ImageRequest
from engine.worker import Aborted, GpuWorker, StopSignal

log = logging.getLogger(__name__)
FETCH_WAIT_S = 1.0  # one pull waits this long for a job (then the loop checks for a stop)
RETRY_S = 0.5  # between tries of a store or publish while the server is away
REMEMBERED_CANCELS = 1000


class ClusterWorker:
    def __init__(self, config: Config, *, backend: Any = None) -> None:
        self.config = config
        self.settings = config.cluster
        self.names = Names(self.settings.name)
        self.name = worker_name(self.settings.worker_name)
        self.backend = backend if backend is not None else create_backend(config)
        self.gpu = GpuWorker(self.backend)
        self.jobs_done = 0
        self._started_at = time.time()
        self._running: str = ""
        self._abort = StopSignal()
        self._cancelled: deque[str] = deque(maxlen=REMEMBERED_CANCELS)
        self._nc: Any = None

    async def __aenter__(self) -> ClusterWorker:
        await self.gpu.load()
        self._nc = await connect(self.settings, f"worker {self.name}")
        self._js = self._nc.jetstream()
        self._kv, self._images = await ensure_streams(self._js, self.names, self.settings)
        await self._nc.subscribe(self.names.cancel("*"), cb=self._on_cancel)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self._kv.delete(self.name)  # gone at once from the bot's count, not after TTL
        except Exception as exc:
            log.info("could not remove this worker's heartbeat: %s", exc)
        await self._nc.close()
        await self.gpu.close()

    async def serve(self, stop: asyncio.Event) -> None:
        """Pull and run jobs, one at a time, until ``stop`` (the job running then finishes)."""
        sub = await self._subscribe()
        beat = asyncio.create_task(self._beat(), name="worker-heartbeat")
        log.info("worker %s ready (%s)", self.name, self.info().gpu)
        try:
            while not stop.is_set() and not self._nc.is_closed:
                msg = await self._next(sub)
                if msg is not None:
                    await self._handle(msg)
        finally:
            await cancel_until_done([beat])
        if self._nc.is_closed and not stop.is_set():  # the server ended it: not coming back
            raise ConnectionError("the NATS server closed this worker's connection for good: "
                                  + explain(self._nc.last_error or ConnectionError("closed")))

    def info(self) -> WorkerInfo:
        limits = self.config.limits
        return WorkerInfo(name=self.name, gpu=gpu_name(self.config), max_pixels=limits.max_pixels,
                          model_name=self.backend.model_name, max_count=limits.images_max,
                          styles=tuple(sorted(self.config.styles)), jobs_done=self.jobs_done,
                          running=self._running, started_at=self._started_at,
                          seen_at=time.time())

    async def _subscribe(self) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig

        # Its own subject only: the bot picks the worker whose card and styles fit the job
        name, subject = self.names.consumer(self.name), self.names.jobs_for(self.name)
        consumer = ConsumerConfig(durable_name=name, name=name,
                                  ack_policy=AckPolicy.EXPLICIT, ack_wait=self.settings.ack_wait_s,
                                  max_deliver=self.settings.max_deliver,
                                  filter_subject=subject, max_ack_pending=-1,
                                  inactive_threshold=CONSUMER_IDLE_S)
        await self._js.add_consumer(self.names.jobs_stream, config=consumer)  # or update it
        return await self._js.pull_subscribe(subject, durable=name,
                                             stream=self.names.jobs_stream)

    async def _next(self, sub: Any) -> Any:
        import nats.errors

        try:
            msgs = await sub.fetch(1, timeout=FETCH_WAIT_S)
        except nats.errors.TimeoutError:
            return None
        except Exception as exc:  # the server away: try again shortly
            log.debug("fetch failed: %s", exc)
            await asyncio.sleep(RETRY_S)
            return None
        return msgs[0] if msgs else None

    async def _beat(self) -> None:
        while True:
            await self._put_info()
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _put_info(self) -> None:
        try:
            await self._kv.put(self.name, self.info().to_bytes())
        except Exception as exc:
            log.debug("heartbeat failed: %s", exc)

    # -- one job -----------------------------------------------------------------------------
    async def _handle(self, msg: Any) -> None:
        item = WorkItem.from_bytes(msg.data)
        if await self._has_outcome(item.job_id):  # done before; only the ack was lost
            await msg.ack()
            return
        self._running = item.job_id
        self._abort.clear()
        if item.job_id in self._cancelled:
            self._abort.set()
        lease = asyncio.create_task(self._keep_lease(msg), name=f"lease-{item.job_id}")
        await self._put_info()
        try:
            outcome = await self._run(item)
            await self._store(outcome)
        finally:
            await cancel_until_done([lease])
            self._running = ""
        await msg.ack()
        self.jobs_done += 1
        await self._put_info()
        log.info("job %s %s (delivery %d)", item.job_id, outcome.status,
                 msg.metadata.num_delivered)

    async def _keep_lease(self, msg: Any) -> None:
        """Renew the lease while the job runs (a dead worker stops renewing it)."""
        while True:
            await asyncio.sleep(self.settings.ack_wait_s / 3)
            try:
                await msg.in_progress()
            except Exception as exc:
                log.warning("could not renew the lease: %s", exc)

    async def _run(self, item: WorkItem) -> Outcome:
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def on_step(step: int, total: int) -> None:  # the GPU thread
            loop.call_soon_threadsafe(self._progress, item.job_id, step, total)

        deadline = started + self.config.engine.job_timeout_s
        ended = Outcome(item.job_id, CANCELLED, worker=self.name,
                        model_name=self.backend.model_name)
        with tempfile.TemporaryDirectory(prefix="flux-input-") as folder:
            try:
                request = await self._with_input(item, Path(folder))
                images = await self.gpu.generate(item.job_id, request, on_step, self._abort,
                                                 deadline)
                pngs = await asyncio.to_thread(result_files.encode, images, request,
                                               self.backend.model_name, self.config)
            except Aborted:
                return ended
            except EngineError as exc:  # out of memory, too slow: the user may read it
                return dataclasses.replace(ended, status=FAILED, error=str(exc))
            except Exception:
                log.exception("job %s failed", item.job_id)
                return dataclasses.replace(
                    ended, status=FAILED, error=f"Something went wrong while making this image "
                    f"({item.job_id}); the bot's admin can find the details in the worker's log.")
        for index, png in enumerate(pngs):
            await self._retry(self._images.put, self.names.image(item.job_id, index), png)
        return dataclasses.replace(ended, status=FINISHED, images=len(pngs),
                                   gpu_s=time.monotonic() - started)

    async def _with_input(self, item: WorkItem, folder: Path) -> ImageRequest:
        """An image-to-image job's picture, fetched from the images bucket to a local file.
        Gone (the bot deleted it after it gave the job up, or it expired): the job fails."""
        from nats.js.errors import ObjectNotFoundError

        if not item.input_object:
            return item.request
        try:
            found = await self._retry(self._images.get, item.input_object)
        except ObjectNotFoundError:
            raise EngineError(N_("The picture this image starts from is no longer there; "
                                 "please send it again.")) from None
        path = folder / "input.png"
        path.write_bytes(found.data)
        return item.request.with_changes(init_image=str(path))

    def _progress(self, job_id: str, step: int, total: int) -> None:
        payload = f"{step} {total}".encode()
        asyncio.ensure_future(self._nc.publish(self.names.progress(job_id), payload))

    async def _store(self, outcome: Outcome) -> None:
        """The outcome, once per job id (the stream keeps one per subject)."""
        await self._retry(self._js.publish, self.names.result(outcome.job_id),
                          outcome.to_bytes(), headers={"Nats-Msg-Id": outcome.job_id})

    async def _has_outcome(self, job_id: str) -> bool:
        from nats.js.errors import NotFoundError

        try:
            await self._js.get_last_msg(self.names.results_stream, self.names.result(job_id))
        except NotFoundError:
            return False
        return True

    async def _retry(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Until it works: the server restarting must not lose a finished image. An object
        that is not there is an answer, not an outage."""
        from nats.js.errors import ObjectNotFoundError

        while True:
            try:
                return await call(*args, **kwargs)
            except ObjectNotFoundError:
                raise
            except Exception as exc:
                log.warning("%s failed (%s); trying again", getattr(call, "__name__", call), exc)
                await asyncio.sleep(RETRY_S)

    async def _on_cancel(self, msg: Any) -> None:
        job_id = msg.subject.rsplit(".", 1)[-1]
        self._cancelled.append(job_id)
        if job_id == self._running:
            self._abort.set()  # the GPU thread stops at the next step


def worker_name(configured: str) -> str:
    """A key the workers bucket accepts: the configured name, else host name and process id."""
    name = configured or f"{socket.gethostname()}-{os.getpid()}"
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "-" for ch in name)


def gpu_name(config: Config) -> str:
    if config.engine.backend == "dry-run":
        return "dry-run (no GPU)"
    try:
        import torch

        return str(torch.cuda.get_device_name(torch.device(config.model.device)))
    except Exception:  # noqa: BLE001 - a name for /status only
        return config.model.device
