"""The engine: one queue for every chat, one job at a time on the GPU.

    async with Engine(config) as engine:
        job = await engine.submit(user, request, origin)
        async for event in job.events(): ...

Every accepted job is written to the journal before ``submit`` returns, so a restart re-queues it
(``recovered_jobs``). Queue order is round-robin across users (``FairQueue``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine import input_image, result_files, retention, styles
from engine.backends import Backend, ModelState, create_backend
from engine.chat_languages import ChatLanguages
from engine.cluster.messages import WorkerInfo
from engine.config import Config
from engine.durable import write_durably
from engine.errors import (
    N_,
    AccessDenied,
    EngineClosed,
    EngineError,
    JobNotFound,
    Phrase,
    QueueFull,
)
from engine.fair_queue import FairQueue
from engine.job import (
    Cancelled,
    Failed,
    Finished,
    Job,
    JobResult,
    JobStatus,
    Progress,
    Queued,
    ResultImage,
    Started,
)
from engine.moderation import Detector, Moderator, Policy
from engine.pending import PendingInteractions, PendingReplies
from engine.rate_limit import Charge, Quota, RateLimiter
from engine.request import ImageRequest, Origin, User
from engine.stats import UsageStats, usage_stats
from engine.step_timing import eta_s, median_step_s
from engine.store import DuplicateJobId, DuplicateRequest, JobRecord, Store
from engine.worker import Aborted, GpuWorker, Runner, StopSignal

log = logging.getLogger(__name__)
# Finished jobs (and their PNGs) kept in memory for buttons and late watchers; delivered ones
# leave at once, the journal keeps everything. Bounds memory on a bot that runs for weeks.
KEEP_FINISHED_JOBS = 32
# Fresh ids drawn when one is taken already (8 hex digits: a collision is rare, never fatal).
ID_ATTEMPTS = 5


class AlreadyAccepted(Exception):
    """The platform sent a command again (after a crash) whose job is in the journal already:
    nothing to do, and nothing to tell the user (not an ``EngineError``)."""


@dataclass(eq=False)
class _Run:
    """A job between its start and the end of its GPU part, and the signal that stops it."""

    job: Job
    signal: StopSignal = field(default_factory=StopSignal)


@dataclass(frozen=True)
class Health:
    """What ``/status`` shows an admin."""

    queued: int
    running: Job | None
    paused: bool
    accepting: bool
    finished: int
    failed: int
    last_error: str | None
    memory: dict[str, float]
    workers: tuple[WorkerInfo, ...] = ()  # a cluster's live GPU workers (none: this GPU)
    model: ModelState | None = None  # how this GPU's model runs (backend.model_state)


class Engine:
    def __init__(
        self,
        config: Config,
        backend: Backend | None = None,
        *,
        clock: Callable[[], float] = time.time,
        recover: bool = True,
        worker: Runner | None = None,
        detector: Detector | None = None,
    ) -> None:
        """``recover=False``: leave the journal's unfinished jobs alone (a one-off process, such
        as ``python -m bot imagine``, beside a running bot that owns them). ``detector``: the
        NSFW check's (tests); NudeNet when ``[moderation] nsfw_check`` is on."""
        self.config = config
        self._recover_on_start = recover
        self.backend = backend if backend is not None else create_backend(config)
        self.clock = clock
        self.store = Store(config.engine.database)
        self.pending = PendingInteractions(self.store)  # commands not yet answered
        self.pending_replies = PendingReplies(self.store)  # answers not yet posted
        self.chat_languages = ChatLanguages(self.store)  # /language per chat
        self.rate_limiter = RateLimiter(self.store, config.rate_limit, config.access, clock,
                                        config.limits)
        # Where jobs run: this process's GPU, or GPU workers elsewhere (engine/cluster/)
        self._worker: Runner = worker if worker is not None else GpuWorker(self.backend)
        self.moderator = Moderator(config.moderation, detector)
        self._queue: FairQueue[Job] = FairQueue(weight=lambda job: job.request.count)
        self._jobs: dict[str, Job] = {}  # live jobs: queued, running, and recent finished ones
        self._terminal: deque[Job] = deque()  # finished jobs still in _jobs, oldest first
        self._recovered: list[Job] = []
        # Jobs started and not yet past their GPU part: one here, one per busy worker in a cluster
        self._runs: dict[str, _Run] = {}
        self._completing: set[asyncio.Task[None]] = set()  # PNG, file and journal, off the GPU
        self._draining: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        self._put_back: dict[str, Job] = {}  # stopped by a shutdown, queued in the journal
        self._worker_hung = False  # a step did not return within STOP_WAIT_S of a shutdown
        self._wake = asyncio.Event()
        self._worker.on_room(self._wake.set)  # a worker joined: a job may start
        self._gpu_idle = asyncio.Event()  # no job between start and the end of its GPU part
        self._gpu_idle.set()
        self._submit_lock = asyncio.Lock()
        self._announced_all_at = float("-inf")  # when the whole line last heard its places
        self._scheduler: asyncio.Task[None] | None = None
        self._accepting = False
        self._paused = False
        self._counts = {"finished": 0, "failed": 0}
        self._last_error: str | None = None
        self.load_seconds: float | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Engine:
        await self.store.__aenter__()
        try:
            # the cost model's step times measured on this GPU before the restart
            self.rate_limiter.costs.seed(await self.store.recent_step_times())
            await asyncio.to_thread(self.moderator.load)  # a missing extra stops us here
            started = time.monotonic()
            await self._worker.load()
            self.load_seconds = time.monotonic() - started
            if self._recover_on_start:
                await self._recover()
        except BaseException:
            await self.store.__aexit__(None, None, None)
            raise
        self._accepting = True
        self._scheduler = asyncio.create_task(self._schedule(), name="engine-scheduler")
        if self.config.engine.keep_outputs_days > 0 and self._recover_on_start:
            self._pruner = asyncio.create_task(retention.prune_daily(self.prune),
                                               name="engine-pruner")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking jobs and give the running one up to the grace period to finish.

        A job still running after that is stopped and put back to queued in the journal, so
        the next start runs it again; queued jobs stay queued there too. A job its user
        cancels meanwhile ends cancelled at once. Calling it again waits for the same drain.
        """
        self._accepting = False
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain(grace_s), name="engine-drain")
        await asyncio.shield(self._draining)

    async def _drain(self, grace_s: float | None) -> None:
        grace = self.config.engine.shutdown_grace_s if grace_s is None else grace_s
        running = [run.job for run in self._runs.values()]
        if running:
            ids = ", ".join(job.id for job in running)
            waits = [asyncio.ensure_future(job.wait()) for job in running]
            _, late = await asyncio.wait(waits, timeout=grace)
            for wait in late:
                wait.cancel()
            if late:
                log.warning("job %s still running after %.0f s grace; it will run again after "
                            "the restart", ids, grace)
                for run in list(self._runs.values()):  # each stops at its next step
                    run.signal.stop("shutdown")
                try:  # a hung step must not hold the stop
                    await asyncio.wait_for(self._gpu_idle.wait(), STOP_WAIT_S)
                except TimeoutError:
                    log.error("job %s did not stop within %.0f s; leaving it", ids,
                              STOP_WAIT_S)
                    self._worker_hung = True
        await self._settle_completions()

    async def _settle_completions(self) -> None:
        """Let images already made be encoded, saved and journalled (seconds at most)."""
        while self._completing:
            await asyncio.gather(*list(self._completing), return_exceptions=True)

    async def shutdown(self, grace_s: float | None = None) -> None:
        """``drain``, then stop the scheduler and close the backend and the store."""
        await self.drain(grace_s)
        if self._pruner is not None:
            self._pruner.cancel()
            await asyncio.gather(self._pruner, return_exceptions=True)
            self._pruner = None
        if self._scheduler is not None:
            self._scheduler.cancel()
            try:
                await self._scheduler
            except asyncio.CancelledError:
                pass
            self._scheduler = None
        await self._settle_completions()
        closing = time.monotonic()
        log.info("engine stopping: closing the model and the journal")
        if self._worker_hung:  # the running step never returned (_drain): do not queue behind it
            self._worker.abandon()
        else:
            await self._worker.close()
        await self.store.__aexit__(None, None, None)
        # an exit once took over 60 s after the last job with nothing logged (docs/benchmarks.md,
        # 2026-12-07 float8): this says whether closing the model was the slow part
        log.info("engine stopped: model and journal closed in %.1f s", time.monotonic() - closing)

    # -- submitting ------------------------------------------------------------------------
    async def submit(self, user: User, request: ImageRequest, origin: Origin,
                     key: str | None = None) -> Job:
        """Accept a job (or raise an ``EngineError`` saying why not) and journal it first.
        ``key``: the command's own id on its platform (a Telegram update id): a command sent
        again raises ``AlreadyAccepted`` instead of queueing a second job."""
        if not self._accepting:
            raise EngineClosed(N_("The bot is shutting down; please try again in a minute."))
        self._check_banned(user, request)
        styles.check_style(request.style, self.config.styles)  # nothing queued for an unknown one
        self._worker.check_runnable(request)  # a cluster: some worker online can run it
        async with self._submit_lock:
            self._check_capacity(user)
            charge = await self.rate_limiter.admit(user, request, origin)  # admins: no limit
            job = await self._journal_new_job(user, request, origin, key, charge)
            self._enqueue(job)
        log.info("job %s queued for %s (position %s)", job.id, user.key,
                 job.announced_position)
        return job

    async def _journal_new_job(self, user: User, request: ImageRequest, origin: Origin,
                               key: str | None, charge: Charge) -> Job:
        """A new job with an id no other job in the journal has (ids are short, for typing)."""
        for _ in range(ID_ATTEMPTS):
            job = Job(id=new_job_id(), user=user, origin=origin, request=request,
                      created_at=self.clock(), _engine=self)
            try:
                job.seq = await self.store.add_job(job.id, user, origin, request,
                                                   job.created_at, request_key=key,
                                                   cost=charge.cost, group_key=charge.group)
                return job
            except DuplicateRequest:
                raise AlreadyAccepted(f"{key} has its job already") from None
            except DuplicateJobId:
                log.info("job id %s taken; drawing another", job.id)
        raise EngineError(N_("Sorry, the bot could not take this job; please try again."))

    def _check_banned(self, user: User, request: ImageRequest) -> None:
        lowered = request.prompt.casefold()
        for word in self.config.access.banned_words:
            if word and word.casefold() in lowered:
                log.warning("refused prompt from %s: banned word %r", user.key, word)
                raise AccessDenied(
                    N_("Sorry, this prompt contains a word this bot does not allow."))

    def _check_capacity(self, user: User) -> None:
        """The queue caps count requests (a job of --n 4 is one: its images run together);
        the rate limit counts images."""
        # counted, not ordered: the fair order of a deep queue costs O(n log n) to build
        mine = self._queue.count(user.key) + sum(
            1 for run in self._runs.values() if run.job.user == user)
        cap = self.config.engine.max_queue_per_user
        if mine >= cap:
            message = N_("You already have {mine} request waiting (the most is {cap}); please "
                         "wait for one to finish or cancel one.") if mine == 1 else \
                N_("You already have {mine} requests waiting (the most is {cap}); please wait "
                   "for one to finish or cancel one.")
            raise QueueFull(message, mine=mine, cap=cap)
        total = len(self._queue) + len(self._runs)
        if total >= self.config.engine.max_queue_total:
            raise QueueFull(N_("The queue is full right now; please try again in a few minutes."))

    def _enqueue(self, job: Job) -> None:
        self._jobs[job.id] = job
        self._queue.push(job.user.key, job)
        job._emit(Queued(self.position_of(job) or 1))
        self._wake.set()

    # -- queries ---------------------------------------------------------------------------
    def is_admin(self, user: User) -> bool:
        return self.config.access.is_admin(user)

    def may_press(self, record: JobRecord, user: User, action: str) -> bool:
        """A button under a job's message: its owner presses any; an admin may also cancel
        it (to stop a job), but makes no images from another's job on its quota."""
        if record.user == user:  # a User is its (platform, user_id): names may differ
            return True
        return action == "cancel" and self.is_admin(user)

    def position_of(self, job: Job) -> int | None:
        for index, queued in enumerate(self._queue.ordered(), start=1):
            if queued is job:
                return index
        return None

    def get_job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    @property
    def _running(self) -> Job | None:
        """The job on the GPU (in a cluster, the longest running one)."""
        return next(iter(self._runs.values())).job if self._runs else None

    def _active_jobs(self) -> list[Job]:
        running = [run.job for run in self._runs.values()]
        return running + list(self._queue.ordered())

    def jobs_of(self, user: User) -> list[Job]:
        """The user's running and queued jobs, in the order they will run."""
        return [j for j in self._active_jobs() if j.user == user]

    def queued_count(self) -> int:
        return len(self._queue)

    async def quota(self, user: User, origin: Origin | None = None) -> Quota:
        """The user's balance; with the chat's ``origin``, a capped server's or group's too."""
        return await self.rate_limiter.quota(user, origin)

    async def job_record(self, job_id: str) -> JobRecord | None:
        """A job from the journal (also after a restart): buttons use this to re-roll."""
        return await self.store.get_job(job_id)

    def recovered_jobs(self, platform: str) -> list[Job]:
        """Jobs restored from the journal for ``platform``; its adapter delivers their results."""
        return [j for j in self._recovered if j.origin.platform == platform]

    async def stats(self) -> UsageStats:
        """``/stats``: the last day's and week's use of the GPU, from the journal."""
        return await usage_stats(self.store, self.clock())

    def health(self) -> Health:
        return Health(queued=len(self._queue), running=self._running, paused=self._paused,
                      accepting=self._accepting, finished=self._counts["finished"],
                      failed=self._counts["failed"], last_error=self._last_error,
                      memory=self.backend.memory_info(), workers=tuple(self._worker.workers()),
                      model=self.backend.model_state())

    # -- admin -----------------------------------------------------------------------------
    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    async def set_limit_override(self, user: User, images_per_window: int | None) -> None:
        await self.store.set_limit_override(user, images_per_window)

    async def cancel_named_or_latest(self, job_id: str, by: User) -> tuple[str | None, bool]:
        """/cancel [id] on every platform: the job named, or with no id the user's latest
        waiting or running one. (Its id, or None when they have none; whether it was
        stopped.) ``JobNotFound`` for another's job unless ``by`` is an admin."""
        if not job_id:
            mine = self.jobs_of(by)
            if not mine:
                return None, False
            job_id = mine[-1].id
        return job_id, await self.cancel(job_id, by)

    async def cancel(self, job_id: str, by: User) -> bool:
        """Cancel a queued or running job; its owner or an admin may. False if already over
        (or its image is made and being saved)."""
        job = self._jobs.get(job_id)
        if job is None or (job.user != by and not self.is_admin(by)):
            raise JobNotFound(N_("I could not find that job among yours."))
        if job.status is JobStatus.QUEUED and self._queue.remove(job.user.key, job):
            await self._finish(job, Cancelled(by_owner=job.user == by), JobStatus.CANCELLED)
            await self.store.refund(job.id)  # it never ran
            self._announce_positions()
            return True
        run = self._runs.get(job.id)
        if run is not None:  # running, or being started: stops at its next step
            run.signal.by_owner = job.user == by
            run.signal.stop("cancel")
            return True
        if job.id in self._put_back:  # stopped by the shutdown, waiting for the restart
            await self._cancel_put_back(job, by_owner=job.user == by)
            return True
        return False

    async def _cancel_put_back(self, job: Job, *, by_owner: bool) -> None:
        """A job the shutdown put back in line is cancelled after all. It is a queued job again
        (the journal cleared its start), so, like any job cancelled while queued, it is not
        charged."""
        self._put_back.pop(job.id, None)
        await self._finish(job, Cancelled(by_owner=by_owner), JobStatus.CANCELLED)

    # -- delivery bookkeeping (adapters call these) -----------------------------------------
    async def mark_delivered(self, job: Job, where: str, *, keep_file: bool = False) -> None:
        """The result reached its chat. Without ``engine.save_outputs`` its file goes, unless
        the file is the delivery itself (``keep_file``: the console and ``imagine``)."""
        await self.store.mark_delivered(job.id, at=self.clock(), where=where)
        self._forget(job)
        result = job.result_now
        if not self.config.engine.save_outputs and not keep_file and result:
            for image in result.images:
                if image.path:
                    Path(image.path).unlink(missing_ok=True)

    async def note_status_message(self, job: Job, ref: str) -> None:
        """The adapter's message that shows this job's progress (``chat:message``): after a
        restart the adapter edits it again instead of posting another one."""
        job.origin.extra["status_message"] = ref
        await self.store.update_origin(job.id, job.origin)

    async def mark_undelivered(self, job: Job, error: str) -> None:
        await self.store.mark_undelivered(job.id, at=self.clock(), error=error)

    async def give_up_delivery(self, job: Job, reason: str) -> None:
        log.warning("giving up delivering job %s: %s", job.id, reason)
        await self.store.give_up_delivery(job.id, at=self.clock(), reason=reason)
        self._forget(job)

    def _forget(self, job: Job) -> None:
        if job.status.is_terminal:
            self._jobs.pop(job.id, None)
            if job.recovered and job in self._recovered:
                self._recovered.remove(job)  # its PNG leaves memory with it

    def _retire(self, job: Job) -> None:
        """A job just ended: keep it for a while, then let it go (its record stays). A
        recovered job stays in ``_recovered`` until it is delivered or given up: it may have
        ended before its adapter started and asked for it."""
        self._terminal.append(job)
        while len(self._terminal) > KEEP_FINISHED_JOBS:
            old = self._terminal.popleft()
            if not old.recovered:
                self._jobs.pop(old.id, None)

    # -- running ---------------------------------------------------------------------------
    async def _schedule(self) -> None:
        """Start the next job in line whenever the worker has room: one job at a time on this
        process's GPU; in a cluster, as many as workers are free (so the fair order holds
        there too: nothing waits in a worker's own queue). Job tasks belong to this one."""
        async with asyncio.TaskGroup() as runs:
            while True:
                job = self._next_job()
                if job is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                run = _Run(job)
                self._runs[job.id] = run
                self._gpu_idle.clear()
                self._announce_positions()
                runs.create_task(self._run_guarded(run), name=f"run-{job.id}")

    def _next_job(self) -> Job | None:
        # Paused or shutting down: start nothing new (queued jobs stay in the journal).
        if self._paused or not self._accepting or not self._worker.has_room(len(self._runs)):
            return None
        # the first in fair order that a free worker can run (in a cluster a big job waits for a
        # big card while smaller jobs use the others; here, simply the first)
        return self._queue.pop_first(
            lambda job: self._worker.claim(job.id, job.request, len(self._runs)))

    async def _run_guarded(self, run: _Run) -> None:
        try:
            await self._run(run)
        except Exception:  # never let one job stop the queue
            log.exception("job %s: unexpected engine error", run.job.id)
        finally:
            del self._runs[run.job.id]
            self._worker.release(run.job.id)
            if not self._runs:
                self._gpu_idle.set()
            self._wake.set()  # room for the next job

    async def _run(self, run: _Run) -> None:
        """The GPU part of a job. Once its image is made, encoding, saving and journalling run
        beside the next job (``_complete``), so the GPU never waits for them."""
        loop = asyncio.get_running_loop()
        job, signal = run.job, run.signal
        marked_running = not signal.is_set()
        if marked_running:
            await self.store.set_status(job.id, "running", at=self.clock())
        if signal.is_set():  # stopped while being started: it never reached the GPU
            await self._stopped_before_start(job, signal, marked_running)
            return
        job._emit(Started())
        started = time.monotonic()
        step_times: list[float] = []

        def on_step(step: int, total: int) -> None:  # worker thread
            step_times.append(time.monotonic())
            eta = eta_s(started, step_times, step, total)
            loop.call_soon_threadsafe(job._emit, Progress(step, total, eta))

        deadline = started + self.config.engine.job_timeout_s
        try:
            images = await self._worker.generate(job.id, job.request, on_step, signal,
                                                 deadline)
        except Aborted:
            if signal.reason == "shutdown":  # runs again after the restart
                await self.store.set_status(job.id, "queued", at=self.clock())
                self._put_back[job.id] = job
                if signal.reason == "cancel":  # its user cancelled meanwhile
                    await self._cancel_put_back(job, by_owner=signal.by_owner)
                return
            # cancelled while running: its GPU time was spent, so it stays charged
            await self._finish(job, Cancelled(by_owner=signal.by_owner), JobStatus.CANCELLED)
            return
        except EngineError as exc:
            await self._fail(job, exc.phrase, refund=True)
            return
        except Exception as exc:
            log.exception("job %s failed", job.id)
            await self._fail_unexpectedly(job, exc)
            return
        gpu_s = time.monotonic() - started
        task = asyncio.create_task(self._complete(job, images, started, gpu_s, step_times),
                                   name=f"complete-{job.id}")
        self._completing.add(task)
        task.add_done_callback(self._completing.discard)

    async def _stopped_before_start(self, job: Job, signal: StopSignal,
                                    marked_running: bool) -> None:
        if signal.reason == "shutdown":
            if marked_running:
                await self.store.set_status(job.id, "queued", at=self.clock())
            return
        await self._finish(job, Cancelled(by_owner=signal.by_owner), JobStatus.CANCELLED)
        await self.store.refund(job.id)  # cancelled before any GPU work: not charged

    async def _complete(self, job: Job, images: object, started: float, gpu_s: float,
                        step_times: list[float]) -> None:
        """Encode the PNG and write it on a thread of its own, journal it, tell the watchers.
        Any failure fails this job (and, if even that cannot be journalled, still tells its
        watchers), so no job is left running with nobody to end it."""
        try:
            saved = await asyncio.to_thread(self._save, job, images)
            saved = await self._moderated(job.id, job.origin, saved)
            result = JobResult(saved, job.request, self.backend.model_name,
                               time.monotonic() - started)
            await self.store.set_status(job.id, "finished", at=self.clock(),
                                        result_path=result.path)
        except Exception as exc:
            log.exception("job %s: saving the image failed", job.id)
            try:
                await self._fail_unexpectedly(job, exc)
            except Exception:
                log.exception("job %s: could not journal the failure", job.id)
                job._emit(Failed(N_("Something went wrong while saving this image; the bot's "
                                    "admin can find the details in the log.")))
            return
        self._counts["finished"] += 1
        job._emit(Finished(result))  # the result goes out first; the timing is bookkeeping
        self._retire(job)
        per_step = median_step_s(step_times)
        await self._record_timing(job, gpu_s, per_step)
        log.info("job %s finished in %.2f s (GPU %.2f s%s)", job.id, result.seconds, gpu_s,
                 f", {per_step:.3f} s/step" if per_step else "")

    async def _record_timing(self, job: Job, gpu_s: float, per_step: float | None) -> None:
        """Journal the job's GPU seconds and s/step (``/stats``, the cost calibration). The
        image is made and journalled already: a failure here is logged, never the job's."""
        self.rate_limiter.costs.observe(job.request.width * job.request.height, per_step)
        try:
            await self.store.record_timing(job.id, gpu_s=gpu_s, step_s=per_step)
        except Exception:
            log.exception("job %s: could not journal its timing", job.id)

    async def _moderated(self, job_id: str, origin: Origin,
                         images: tuple[ResultImage, ...]) -> tuple[ResultImage, ...]:
        """The NSFW check (``[moderation]``) before anything is posted: on a thread of its own,
        never the GPU worker's (the next job runs meanwhile) nor the event loop."""
        if not self.moderator.needs_check(origin):
            return images
        policies = await asyncio.to_thread(self.moderator.judge, job_id, origin,
                                           [image.png for image in images])
        return tuple(dataclasses.replace(image, policy=policy)
                     for image, policy in zip(images, policies, strict=True))

    async def policy_of(self, job_id: str, origin: Origin, png: bytes) -> Policy:
        """The NSFW policy for one image posted again (U: an image of a grid alone)."""
        judged = await self._moderated(job_id, origin, (ResultImage(png, 0),))
        return judged[0].policy

    def _save(self, job: Job, images: object) -> tuple[ResultImage, ...]:
        """Encode the PNGs and write them to the output folder (a thread, beside the GPU),
        one file per image, named by the job and the image's seed (``result_files``)."""
        pngs = result_files.encode(images, job.request, self.backend.model_name, self.config)
        folder = Path(self.config.engine.output_dir) / time.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        saved = []
        for seed, png in zip(job.request.seeds, pngs, strict=True):
            path = result_files.path_of(folder, job.id, seed)
            write_durably(path, png)  # on disk before the journal says finished
            saved.append(ResultImage(png, seed, str(path)))
        return tuple(saved)

    async def _fail_unexpectedly(self, job: Job, exc: BaseException) -> None:
        await self._fail(job, Phrase(N_("Something went wrong while making this image ({job}); "
                                        "the bot's admin can find the details in the log."),
                                     job=job.id), refund=True, detail=repr(exc))

    async def _fail(self, job: Job, why: Phrase, *, refund: bool, detail: str = "") -> None:
        """``why``: the user's sentence (journalled in English, shown in their language)."""
        reason = str(why)
        self._counts["failed"] += 1
        self._last_error = f"{job.id}: {detail or reason}"
        log.warning("job %s failed: %s", job.id, detail or reason)
        await self._finish(job, Failed(reason, why), JobStatus.FAILED, error=reason)
        if refund:
            await self.store.refund(job.id)

    async def _finish(self, job: Job, event: Failed | Cancelled | Finished, status: JobStatus,
                      error: str | None = None) -> None:
        await self.store.set_status(job.id, status.value, at=self.clock(), error=error)
        job._emit(event)
        self._retire(job)

    def _announce_positions(self) -> None:
        """Tell waiting jobs their new place in line when it moved meaningfully: always near
        the front, further back once it moved by a fifth or more. A job at place p hears about
        O(log p) moves in all (a queue of 1,000 moving one place at a time told every job every
        move: half a million events). The front is looked at on every move (the order is made
        lazily, so that costs little); the whole line at most every ``ANNOUNCE_ALL_EVERY_S``
        (building a deep queue's fair order on every start cost a tenth of the throughput)."""
        now = time.monotonic()
        whole = now - self._announced_all_at >= ANNOUNCE_ALL_EVERY_S
        if whole:
            self._announced_all_at = now
        for index, job in enumerate(self._queue.ordered(), start=1):
            if index > ALWAYS_ANNOUNCED and not whole:
                break
            if worth_announcing(job.announced_position, index):
                job._emit(Queued(index))

    # -- retention -------------------------------------------------------------------------
    async def prune(self) -> int:
        """Delete what is older than ``engine.keep_outputs_days`` (``engine/retention.py``)."""
        return await retention.prune(self.store, self.config.engine.keep_outputs_days,
                                     self.clock(),
                                     input_image.inputs_folder(self.config.engine.output_dir))

    # -- restart ---------------------------------------------------------------------------
    async def _recover(self) -> None:
        """Re-queue what was queued or running when the bot stopped, in the original order."""
        for record in await self.store.unfinished_jobs():
            if record.status == "running":
                await self.store.set_status(record.job_id, "queued", at=self.clock())
            job = Job(id=record.job_id, user=record.user, origin=record.origin,
                      request=record.request, created_at=record.created_at, seq=record.seq,
                      recovered=True, _engine=self)
            self._recovered.append(job)
            self._enqueue(job)
        for record in await self.store.undelivered_jobs():
            # read back and checked again (same bytes, same verdict; the policy is today's)
            images = await asyncio.to_thread(_finished_images, record)
            if images:
                images = await self._moderated(record.job_id, record.origin, images)
            finished = _job_from_finished_record(record, self, images)
            if finished is not None:
                self._recovered.append(finished)
        if self._recovered:
            log.info("recovered %d jobs from the journal", len(self._recovered))


def _finished_images(record: JobRecord) -> tuple[ResultImage, ...] | None:
    if record.status == "finished" and record.result_path:
        return result_files.read(record.result_path, record.request)
    return None


def _job_from_finished_record(record: JobRecord, engine: Engine,
                              images: tuple[ResultImage, ...] | None) -> Job | None:
    job = Job(id=record.job_id, user=record.user, origin=record.origin, request=record.request,
              created_at=record.created_at, seq=record.seq, recovered=True, _engine=engine)
    if images:
        job._emit(Finished(JobResult(images, record.request, model_name="", seconds=0.0)))
    elif record.status == "failed":
        job._emit(Failed(record.error or N_("This image could not be made.")))
    else:
        return None
    engine._jobs[job.id] = job
    return job


# How long a shutdown waits, after the grace, for the running job to stop at its next step.
STOP_WAIT_S = 10.0


# Places in line that are always announced when they change (the front of the queue).
ALWAYS_ANNOUNCED = 10
# How often the places further back are looked at again.
ANNOUNCE_ALL_EVERY_S = 1.0


def worth_announcing(last: int | None, now: int) -> bool:
    if last is None:
        return True
    if now == last:
        return False
    return now <= ALWAYS_ANNOUNCED or now <= last * 0.8 or now >= last * 1.25


def new_job_id() -> str:
    return secrets.token_hex(4)


__all__ = ["Engine", "Health"]
