"""Shared fixtures: an engine on a temporary SQLite file with a recording test backend."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from engine.backends.dry_run import DryRunBackend
from engine.config import Config
from engine.engine import Engine
from engine.request import ImageRequest, Origin, User
from engine.store import Store


class RecordingBackend(DryRunBackend):
    """The dry-run backend that records how many jobs ran at once and in which order.

    ``gate`` (when set) holds each generation until the test releases it; ``fail_with`` maps a
    prompt to an exception raised for it (once, or always).
    """

    model_name = "recording test backend"

    def __init__(self, step_seconds: float = 0.0) -> None:
        super().__init__(step_seconds)
        self.order: list[tuple[str, str]] = []  # (user key, prompt)
        self.running = 0
        self.max_running = 0
        self.loads = 0
        self.closed = False
        self.reduced = 0
        self.gate: threading.Event | None = None
        self.fail_with: dict[str, list[BaseException]] = {}
        self._lock = threading.Lock()
        self.thread_names: set[str] = set()

    def load(self) -> None:
        self.loads += 1
        super().load()

    def generate(self, request: ImageRequest, on_step):  # type: ignore[no-untyped-def]
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        self.thread_names.add(threading.current_thread().name)
        try:
            self.order.append(("?", request.prompt))
            if self.gate is not None:
                self.gate.wait(10)
            failures = self.fail_with.get(request.prompt)
            if failures:
                raise failures.pop(0)
            return super().generate(request, on_step)
        finally:
            with self._lock:
                self.running -= 1

    def reduce_memory(self) -> bool:
        self.reduced += 1
        return True

    def close(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_request(prompt: str = "a red fox", *, seed: int = 7, steps: int = 4,
                 width: int = 256, height: int = 256) -> ImageRequest:
    return ImageRequest(prompt=prompt, seed=seed, steps=steps, width=width, height=height,
                        guidance=3.5)


def discord_user(uid: str) -> User:
    return User("discord", uid, f"user{uid}")


ORIGIN = Origin("discord", chat_id="100")


@pytest.fixture
def config(tmp_path: Path) -> Config:
    cfg = Config()
    cfg.engine.backend = "dry-run"
    cfg.engine.database = str(tmp_path / "bot.sqlite3")
    cfg.engine.output_dir = str(tmp_path / "out")
    cfg.engine.dry_run_step_s = 0.0
    cfg.engine.max_queue_per_user = 5
    cfg.rate_limit.images_per_window = 100
    return cfg


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A journal of its own, closed at the end of the test."""
    async with Store(tmp_path / "bot.sqlite3") as opened:
        yield opened


@pytest.fixture
async def engine_factory(config: Config, backend: RecordingBackend, clock: FakeClock
                         ) -> AsyncIterator[Callable[..., Engine]]:
    """Build engines that are closed at the end of the test, whatever happens."""
    opened: list[Engine] = []

    async def factory(cfg: Config | None = None, be: object | None = None) -> Engine:
        engine = Engine(cfg or config, be or backend, clock=clock)  # type: ignore[arg-type]
        await engine.__aenter__()
        opened.append(engine)
        return engine

    yield factory  # type: ignore[misc]
    for engine in opened:
        if engine._scheduler is not None:
            await engine.shutdown(grace_s=5)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


@pytest.fixture(params=[False, True], ids=["block-cast", "layer-cast"])
def layer_cast(request) -> bool:
    """The block streamer's two ways of computing from float8: a cast of the whole block into
    a bf16 work buffer (T5's, and the DiT's by default), and each linear layer casting its own
    weight (the DiT's with model.layer_cast)."""
    return request.param
