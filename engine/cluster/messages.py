"""What travels between the bot and its workers: typed, as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from engine.request import ImageRequest


@dataclass(frozen=True)
class WorkItem:
    """A job handed out: its id (the key of everything else) and its request. ``input_object``:
    the picture an image-to-image job starts from, in the images bucket."""

    job_id: str
    request: ImageRequest
    input_object: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps({"job_id": self.job_id, "request": self.request.to_json(),
                           "input_object": self.input_object}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkItem:
        raw = json.loads(data)
        return cls(raw["job_id"], ImageRequest.from_json(raw["request"]),
                   raw.get("input_object", ""))


FINISHED, FAILED, CANCELLED = "finished", "failed", "cancelled"


@dataclass(frozen=True)
class Outcome:
    """How a job ended on a worker. ``images``: PNGs in the images bucket (``Names.image``);
    ``error``: a sentence a user may read (failed)."""

    job_id: str
    status: str  # FINISHED | FAILED | CANCELLED
    images: int = 0
    error: str = ""
    worker: str = ""
    model_name: str = ""
    gpu_s: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Outcome:
        return cls(**json.loads(data))


@dataclass(frozen=True)
class WorkerInfo:
    """A worker's heartbeat (the workers bucket, one key per worker): what it can run and how
    it is doing. ``seen_at`` is the worker's clock."""

    name: str
    gpu: str
    model_name: str
    max_pixels: int
    max_count: int
    styles: tuple[str, ...] = ()  # the [styles] it has (a job's --style must be one)
    jobs_done: int = 0
    running: str = ""  # the job it runs now, if any
    started_at: float = 0.0
    seen_at: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkerInfo:
        raw = json.loads(data)
        return cls(**{**raw, "styles": tuple(raw.get("styles", ()))})
