"""A job's objects the bot no longer needs: its PNGs and the picture an image-to-image job
started from, in the images bucket (no NATS here: ``RemoteWorker`` deletes what falls due).

They become leftovers when the job ends for the bot: its outcome taken (the PNGs are then in
the bot's hands), or the bot stopped waiting (cancelled, too late, failed). They are deleted
``keep_s`` later, when the engine has long written the PNGs to disk and journalled the job
(milliseconds after it takes them): until then a bot killed in between still finds them
after its restart. A job stopped by a shutdown is no leftover: it goes on running on its worker
and the restarted bot takes it. Whatever a killed bot never deleted expires with the bucket's
``result_ttl_s``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# Longer than the engine ever takes to save and journal a job it took (a few milliseconds).
KEEP_TAKEN_S = 60.0


@dataclass(frozen=True)
class Leftover:
    job_id: str
    images: int  # PNGs the worker may have stored (``Names.image(job_id, 0..images-1)``)
    input_image: bool  # an image-to-image job's picture (``Names.input_image``)
    due: float  # time.monotonic() from when it may go


class Leftovers:
    def __init__(self, keep_s: float = KEEP_TAKEN_S) -> None:
        self.keep_s = keep_s
        self._waiting: deque[Leftover] = deque()  # by due time: each is noted ``keep_s`` on

    def note(self, job_id: str, images: int, input_image: bool, now: float) -> None:
        if images or input_image:
            self._waiting.append(Leftover(job_id, images, input_image, now + self.keep_s))

    def due(self, now: float) -> list[Leftover]:
        """Those whose time has come, taken off the list."""
        found = []
        while self._waiting and self._waiting[0].due <= now:
            found.append(self._waiting.popleft())
        return found

    def all(self) -> list[Leftover]:
        """Every one, due or not (at the bot's clean shutdown: the engine has journalled every
        job it took by then)."""
        found = list(self._waiting)
        self._waiting.clear()
        return found

    def __len__(self) -> int:
        return len(self._waiting)
