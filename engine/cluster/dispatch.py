"""The engine's ``Runner`` for a cluster: jobs go to GPU workers through NATS JetStream.

    engine = Engine(config, backend=NoLocalBackend(), worker=RemoteWorker(config.cluster))

``generate`` has the shape of ``GpuWorker.generate`` (progress through ``on_step``, stopped by
``abort``, failed past ``deadline``) and returns the job's PNGs. Room is one job per live
worker that can run it (``Claims``): the engine starts a job only when such a worker is free,
and the job is published to that worker's own subject. The bot already decides when a job
starts, so it decides where too: exact room per capability and the best fit, where subjects per
capability class would need overlapping consumers (a work-queue stream allows none) and leave
the choice of worker to whichever pulls first. A job whose worker left mid-job goes to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cluster.capability import refusal
from engine.cluster.claims import Claims
from engine.cluster.leftovers import Leftover, Leftovers
from engine.cluster.messages import CANCELLED, FAILED, Outcome, WorkerInfo, WorkItem
from engine.cluster.names import Names, QuietErrors, connect, ensure_streams, read_workers
from engine.cluster.tasks import cancel_until_done
from engine.config import ClusterSection
from engine.errors import N_, EngineError, JobTimedOut, NoWorkerCanRun
from engine.request import ImageRequest
from engine.worker import Aborted, StopSignal

log = logging.getLogger(__name__)
CLIENT_NAME = "imagine-bot"
POLL_S = 0.1  # how often a waiting job looks at its stop signal
RECHECK_S = 2.0  # and at the outcome stream (an outcome sent while this client reconnected)
RETRY_S = 0.5
RECONNECT_S = 2.0  # how often a connection the server closed for good is tried again
SWEEP_S = 1.0  # how often leftovers that fell due are deleted
CLOSE_SWEEP_S = 10.0  # at a clean shutdown, the most spent deleting the rest (else: the TTL)
CANCELS_KEPT_S = 600.0  # how long a cancel is sent again by each new connection
KEPT_STOPPING = N_("This image could not be made: the image workers kept stopping while making "
                   "it.")


@dataclass
class _Waiting:
    future: asyncio.Future[Outcome]
    on_step: Callable[[int, int], None]


class RemoteWorker:
    def __init__(self, settings: ClusterSection) -> None:
        self.settings = settings
        self.names = Names(settings.name)
        self._waiting: dict[str, _Waiting] = {}
        self._claims = Claims()  # which live worker runs which job
        self._leftovers = Leftovers()  # objects of ended jobs, deleted once journalled
        self._wake: Callable[[], None] = lambda: None
        self._tasks: list[asyncio.Task[None]] = []  # this connection's
        self._keeper: asyncio.Task[None] | None = None
        self._nc: Any = None
        # job id -> when its cancel was asked for: sent again by every new session for
        # CANCELS_KEPT_S, so one asked for while the connection was closed for good, or held
        # by nats-py while it reconnected in vain, still stops a worker making that image
        self._cancels: dict[str, float] = {}

    # -- the Runner protocol -----------------------------------------------------------------
    async def load(self) -> None:
        await self._start_session(await connect(self.settings, CLIENT_NAME))
        self._keeper = asyncio.create_task(self._stay_connected(), name="cluster-connection")

    async def close(self) -> None:
        """The engine closes its runner after it journalled every job it took: their objects
        go now, not with the bucket's TTL."""
        if self._keeper is not None:  # first: it could start another session
            await cancel_until_done([self._keeper])
        await self._end_session()
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._delete(self._leftovers.all()), CLOSE_SWEEP_S)
            except TimeoutError:
                log.info("left some finished jobs' images to the server's TTL")
            await self._nc.close()

    def abandon(self) -> None:
        """Nothing runs in this process; jobs left on workers finish there."""

    def has_room(self, running: int) -> bool:
        return bool(self._claims.free())

    def claim(self, job_id: str, request: ImageRequest, running: int) -> bool:
        return self._claims.claim(job_id, request)

    def release(self, job_id: str) -> None:
        self._claims.release(job_id)

    def check_runnable(self, request: ImageRequest) -> None:
        """Refuse at submit a job no live worker can run; one whose workers are busy waits."""
        reason = refusal(self._claims.live(), request)
        if reason is not None:
            raise NoWorkerCanRun(reason)

    def on_room(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def workers(self) -> list[WorkerInfo]:
        """The live workers (``/status``, ``doctor``), by name."""
        return self._claims.live()

    async def generate(self, job_id: str, request: ImageRequest,
                       on_step: Callable[[int, int], None], abort: StopSignal,
                       deadline: float) -> list[bytes]:
        """The job's PNGs, made by whichever worker pulls it; an outcome stored while this bot
        was away (a restart) is taken as it is, and the job is never published twice."""
        waiting = _Waiting(asyncio.get_running_loop().create_future(), on_step)
        self._waiting[job_id] = waiting
        try:
            outcome = await self._stored_outcome(job_id)
            if outcome is None:
                outcome = await self._wait(job_id, request, waiting, abort, deadline)
        except (Aborted, EngineError):
            if abort.reason != "shutdown":  # a shutdown leaves it to run on for the restart
                self._leave(job_id, request, request.count)  # a worker may store it still
            raise
        finally:
            self._waiting.pop(job_id, None)
        self._leave(job_id, request, outcome.images)  # the engine journals it meanwhile
        return await self._images_of(outcome)

    def _leave(self, job_id: str, request: ImageRequest, images: int) -> None:
        self._leftovers.note(job_id, images, bool(request.init_image), time.monotonic())

    # -- the connection ------------------------------------------------------------------------
    async def _start_session(self, nc: Any) -> None:
        """What a connection brings: the streams and buckets, the workers' progress and
        outcomes, and the tasks that watch the workers, the dead letters and the leftovers."""
        self._nc = nc  # first: close() closes it, even if it stops this start half way
        self._js = nc.jetstream()
        self._kv, self._images = await ensure_streams(self._js, self.names, self.settings)
        await nc.subscribe(self.names.progress("*"), cb=self._on_progress)
        await nc.subscribe(self.names.result("*"), cb=self._on_outcome)
        await self._read_workers()
        await self._send_recent_cancels(nc)
        self._tasks = [asyncio.create_task(self._watch_workers(), name="cluster-workers"),
                       asyncio.create_task(self._dead_letters(), name="cluster-dead-letters"),
                       asyncio.create_task(self._sweep(), name="cluster-leftovers")]

    async def _end_session(self) -> None:
        await cancel_until_done(self._tasks)
        self._tasks = []

    async def _stay_connected(self) -> None:
        """The server may close the connection for good (the user JWT in the .creds file
        expired while connected; nats-py does not reconnect then): a new one every few
        seconds, the .creds file read again each time, so a new file in its place is taken
        without a restart. The jobs waiting wait on; an outcome stored meanwhile is read back
        from its stream, as after a bot restart."""
        errors = QuietErrors()  # a file that stays expired: its sentence once a minute
        while True:
            await asyncio.sleep(RECONNECT_S)
            if not self._nc.is_closed:
                continue
            if self._tasks:  # the first try since the server closed it
                await self._end_session()
                log.warning("NATS: connecting again every %.0f s, reading [cluster] "
                            "credentials again each time", RECONNECT_S)
            try:
                await self._start_session(await connect(self.settings, CLIENT_NAME))
            except Exception as exc:  # CredentialsError (still expired, unreadable) and such
                await errors.log(exc)
                await self._nc.close()  # a session started half way: the next try anew
                continue
            log.info("NATS: connected again; %d jobs waiting go on", len(self._waiting))

    # -- one job -------------------------------------------------------------------------------
    async def _hand_out(self, job_id: str, request: ImageRequest, worker: str,
                        abort: StopSignal, deadline: float) -> None:
        item = WorkItem(job_id, request)
        if request.init_image:  # the worker may be on another host: the picture travels too
            data = await asyncio.to_thread(Path(request.init_image).read_bytes)
            name = self.names.input_image(job_id)
            await self._until("storing its input picture", lambda: self._images.put(name, data),
                              abort, deadline)
            item = WorkItem(job_id, request, input_object=name)
        # the id per worker: the same job to the same worker again (a bot restart) is dropped
        await self._until("publishing it", lambda: self._js.publish(
            self.names.jobs_for(worker), item.to_bytes(),
            headers={"Nats-Msg-Id": f"{job_id}.{worker}"}), abort, deadline)
        log.info("job %s handed out to %s", job_id, worker)

    async def _wait(self, job_id: str, request: ImageRequest, waiting: _Waiting,
                    abort: StopSignal, deadline: float) -> Outcome:
        next_check = time.monotonic() + RECHECK_S
        sent_to = ""
        while True:
            self._check_stop(job_id, abort, deadline)
            worker = self._claims.worker_of(job_id)
            if worker and worker != sent_to:  # the first hand-out, or its worker left mid-job
                if sent_to:
                    outcome = await self._moved(job_id, sent_to, worker)
                    if outcome is not None:
                        return outcome
                await self._hand_out(job_id, request, worker, abort, deadline)
                sent_to = worker
            try:
                return await asyncio.wait_for(asyncio.shield(waiting.future), POLL_S)
            except TimeoutError:
                pass
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + RECHECK_S
                outcome = await self._stored_outcome(job_id)
                if outcome is not None:
                    return outcome

    async def _moved(self, job_id: str, left: str, worker: str) -> Outcome | None:
        """Its worker left mid-job and the job goes to ``worker``: unless the outcome came
        meanwhile, or it has gone to ``max_deliver`` workers already (it may be what kills
        them). What waits on the departed worker's subject goes, so it never runs it later."""
        outcome = await self._stored_outcome(job_id)
        if outcome is not None:
            return outcome
        if self._claims.moves_of(job_id) >= self.settings.max_deliver:
            log.error("job %s: its worker left %d times; giving up", job_id,
                      self._claims.moves_of(job_id))
            raise EngineError(KEPT_STOPPING)
        log.warning("job %s: worker %s left; the job goes to %s", job_id, left, worker)
        try:
            await self._js.purge_stream(self.names.jobs_stream, subject=self.names.jobs_for(left))
        except Exception as exc:  # the server away: a returning worker finds the outcome first
            log.info("could not clear %s's jobs: %s", left, exc)
        return None

    def _check_stop(self, job_id: str, abort: StopSignal, deadline: float) -> None:
        """A user's cancel reaches the worker (it stops between steps); a shutdown leaves the
        job running there: its outcome waits for the restarted bot."""
        if abort.is_set():
            if abort.reason == "cancel":
                self._send_cancel(job_id)
            raise Aborted()
        if time.monotonic() > deadline:
            self._send_cancel(job_id)
            raise JobTimedOut("This image took too long and was stopped.")

    def _send_cancel(self, job_id: str) -> None:
        """Now if connected (while nats-py reconnects by itself it buffers the message), and
        again from the next session on, in case this one never reached the server."""
        self._forget_old_cancels()  # a connection that stays up never reaches the other call
        self._cancels[job_id] = time.monotonic()
        if not self._nc.is_closed:
            asyncio.ensure_future(self._publish_cancel(self._nc, job_id))

    async def _publish_cancel(self, nc: Any, job_id: str) -> None:
        with contextlib.suppress(Exception):  # closed meanwhile: the next session sends it
            await nc.publish(self.names.cancel(job_id), b"")

    async def _send_recent_cancels(self, nc: Any) -> None:
        """Sending a cancel twice is harmless (a cancelled job never runs again; a worker
        that has not started it yet skips it); one never sent lets a worker finish an image
        nobody gets."""
        self._forget_old_cancels()
        for job_id in list(self._cancels):
            await nc.publish(self.names.cancel(job_id), b"")
        if self._cancels:
            await nc.flush()
            log.info("NATS: sent again the %d cancels of the last %.0f minutes",
                     len(self._cancels), CANCELS_KEPT_S / 60)

    def _forget_old_cancels(self) -> None:
        now = time.monotonic()
        self._cancels = {job: at for job, at in self._cancels.items()
                         if now - at < CANCELS_KEPT_S}

    async def _images_of(self, outcome: Outcome) -> list[bytes]:
        if outcome.status == FAILED:
            raise EngineError(outcome.error or "This image could not be made.")
        if outcome.status == CANCELLED:
            raise Aborted()
        from nats.js.errors import ObjectNotFoundError

        pngs = []
        for index in range(outcome.images):
            try:
                found = await self._images.get(self.names.image(outcome.job_id, index))
            except ObjectNotFoundError:  # expired (result_ttl_s) before the bot came back
                found = None
            if found is None or found.data is None:
                raise EngineError(N_("Image {number} of this job was lost on its way back."),
                                  number=index + 1)
            pngs.append(found.data)
        return pngs

    # -- what the server keeps -----------------------------------------------------------------
    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            await self._delete(self._leftovers.due(time.monotonic()))

    async def _delete(self, leftovers: list[Leftover]) -> None:
        """A job's PNGs and input picture off the images bucket. One that is not there (never
        stored: a failed job) is fine; one the server could not delete now expires with the
        bucket's TTL."""
        from nats.js.errors import ObjectNotFoundError

        for left in leftovers:
            names = [self.names.image(left.job_id, index) for index in range(left.images)]
            if left.input_image:
                names.append(self.names.input_image(left.job_id))
            for name in names:
                try:
                    await self._images.delete(name)
                except ObjectNotFoundError:
                    pass
                except Exception as exc:
                    log.info("could not delete %s from the images bucket: %s", name, exc)

    async def _stored_outcome(self, job_id: str) -> Outcome | None:
        from nats.js.errors import NotFoundError

        try:
            raw = await self._js.get_last_msg(self.names.results_stream,
                                              self.names.result(job_id))
        except NotFoundError:
            return None
        except Exception as exc:  # the server away: the wait goes on
            log.debug("job %s: could not look for its outcome: %s", job_id, exc)
            return None
        return Outcome.from_bytes(raw.data)

    async def _until(self, what: str, call: Callable[[], Awaitable[Any]], abort: StopSignal,
                     deadline: float) -> Any:
        """Try ``call`` until it works (the server restarting, or a new connection made by
        ``_stay_connected``: each try uses the one there is), the job is stopped or late."""
        while True:
            try:
                return await call()
            except Exception as exc:
                if not self._nc.is_closed:  # closed for good: _stay_connected says it
                    log.warning("%s failed (%s); trying again", what, exc)
            if abort.is_set() or time.monotonic() > deadline:
                raise Aborted() if abort.is_set() else JobTimedOut(
                    "The image workers could not be reached in time.")
            await asyncio.sleep(RETRY_S)

    # -- what the workers send -----------------------------------------------------------------
    async def _on_progress(self, msg: Any) -> None:
        waiting = self._waiting.get(msg.subject.rsplit(".", 1)[-1])
        if waiting is None:
            return
        step, total = (int(part) for part in msg.data.split())
        waiting.on_step(step, total)

    async def _on_outcome(self, msg: Any) -> None:
        """An outcome, taken once: a second one for the same job finds nobody waiting."""
        outcome = Outcome.from_bytes(msg.data)
        waiting = self._waiting.get(outcome.job_id)
        if waiting is not None and not waiting.future.done():
            waiting.future.set_result(outcome)

    async def _watch_workers(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s / 2)
            await self._read_workers()

    async def _read_workers(self) -> None:
        """The workers whose heartbeat has not expired (the bucket's TTL drops the others)."""
        try:
            workers = await read_workers(self._kv)
        except Exception as exc:  # the server away: the last ones known stay
            log.debug("could not read the workers: %s", exc)
            return
        if set(workers) != {w.name for w in self._claims.live()}:
            log.info("workers: %s", ", ".join(sorted(workers)) or "none")
        self._claims.update(workers)  # a job whose worker left gets another first
        if self._claims.free():
            self._wake()  # a worker joined or finished: a job may start

    async def _dead_letters(self) -> None:
        """A job tried ``max_deliver`` times fails: the server's advisory names its message;
        the failure goes to the outcome stream like any other (once, by job id)."""
        sub = await self._until("following the dead letters", lambda: self._js.pull_subscribe(
            self.names.dead_letters, durable="bot", stream=self.names.dead_stream),
            StopSignal(), float("inf"))
        while True:
            try:
                msgs = await sub.fetch(10, timeout=1.0)
            except Exception:  # nothing there (a timeout), or the server away
                await asyncio.sleep(RETRY_S)
                continue
            for msg in msgs:
                await self._fail_dead(msg)
                await msg.ack()

    async def _fail_dead(self, advisory: Any) -> None:
        import json

        seq = json.loads(advisory.data).get("stream_seq")
        try:
            raw = await self._js.get_msg(self.names.jobs_stream, seq)
        except Exception as exc:  # gone already
            log.info("dead letter %s: %s", seq, exc)
            return
        item = WorkItem.from_bytes(raw.data)
        log.error("job %s failed on %d workers; giving up", item.job_id,
                  self.settings.max_deliver)
        outcome = Outcome(item.job_id, FAILED, error=KEPT_STOPPING)
        await self._js.publish(self.names.result(item.job_id), outcome.to_bytes(),
                               headers={"Nats-Msg-Id": item.job_id})
        await self._js.delete_msg(self.names.jobs_stream, seq)


class NoLocalBackend:
    """The bot's backend in a cluster: the images are made elsewhere (``RemoteWorker``)."""

    model_name = "cluster"

    def load(self) -> None:
        pass

    def generate(self, request: ImageRequest, on_step: Callable[[int, int], None]) -> list[Any]:
        raise RuntimeError("in a cluster the workers make the images")

    def close(self) -> None:
        pass

    def reduce_memory(self) -> bool:
        return False

    def memory_info(self) -> dict[str, float]:
        return {}

    def model_state(self) -> None:
        return None  # each worker has its own (its heartbeat names its GPU)
