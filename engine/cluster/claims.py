"""Which worker runs which job: the bot's own ledger (no NATS here).

The engine starts a job only when ``claim`` finds a live worker that can run it and is free;
the job is then published to that worker's own subject. A big job waits for a big worker even
while a small one idles; a small job takes the smallest free worker that fits, so the big card
stays free for what only it can run. A claim whose worker left (its heartbeat expired) is an
orphan: it gets the next free worker that fits before any new job does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.cluster.capability import best_fit
from engine.cluster.messages import WorkerInfo
from engine.request import ImageRequest

# Jobs that ended here lately: a worker's heartbeat may still name one for a beat or two.
REMEMBERED_ENDS = 1000


@dataclass
class Claim:
    request: ImageRequest
    worker: str  # the worker it was given to (gone: an orphan until it gets another)
    moves: int = 0  # times it went to another worker because its worker left mid-job


class Claims:
    def __init__(self) -> None:
        self._claims: dict[str, Claim] = {}
        self._workers: dict[str, WorkerInfo] = {}
        self._ended: deque[str] = deque(maxlen=REMEMBERED_ENDS)

    def update(self, workers: dict[str, WorkerInfo]) -> None:
        """The live workers (their heartbeats); orphans get first pick of the free ones."""
        self._workers = workers
        self._place_orphans()

    def live(self) -> list[WorkerInfo]:
        return sorted(self._workers.values(), key=lambda w: w.name)

    def free(self) -> list[WorkerInfo]:
        busy = {c.worker for c in self._claims.values()}
        return [w for w in self.live() if w.name not in busy and not self._runs_unknown(w)]

    def _runs_unknown(self, worker: WorkerInfo) -> bool:
        """Busy with a job this bot did not hand it (one from before the bot's restart)."""
        return bool(worker.running) and worker.running not in self._claims \
            and worker.running not in self._ended

    def claim(self, job_id: str, request: ImageRequest) -> bool:
        """Take a free worker that can run the job; False (the job waits) when none is free."""
        self._place_orphans()
        adopted = [w for w in self.live() if w.running == job_id]  # still running it there
        chosen = adopted[0] if adopted else best_fit(self.free(), request)
        if chosen is None:
            return False
        self._claims[job_id] = Claim(request, chosen.name)
        return True

    def worker_of(self, job_id: str) -> str:
        claim = self._claims.get(job_id)
        return claim.worker if claim is not None else ""

    def moves_of(self, job_id: str) -> int:
        claim = self._claims.get(job_id)
        return claim.moves if claim is not None else 0

    def release(self, job_id: str) -> None:
        if self._claims.pop(job_id, None) is not None:
            self._ended.append(job_id)

    def _place_orphans(self) -> None:
        for claim in self._claims.values():  # oldest claim first
            if claim.worker in self._workers:
                continue
            chosen = best_fit(self.free(), claim.request)
            if chosen is not None:
                claim.worker, claim.moves = chosen.name, claim.moves + 1
