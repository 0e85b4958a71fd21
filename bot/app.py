"""``python -m bot run``: one engine, every configured adapter, clean shutdown on Ctrl-C/SIGTERM.

Only this module (with ``__main__``) owns signals and the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Protocol

from engine.config import Config
from engine.engine import Engine

log = logging.getLogger(__name__)
# Answers being posted at shutdown get at least this long, even when the running image used up
# the grace (a finished image is worth a few seconds more than one re-sent after the restart).
ANSWER_FLOOR_S = 5.0
HEARTBEAT_S = 30.0


class Adapter(Protocol):
    name: str

    async def start(self) -> None: ...

    async def finish_answers(self, timeout: float) -> int:
        """Let answers being posted finish (shutdown); how many did not in ``timeout``."""
        ...

    async def stop(self) -> None: ...


def make_engine(config: Config) -> Engine:
    """This process's GPU, or with ``[cluster] url`` the cluster's GPU workers (``python -m bot
    worker``; engine/cluster/): the bot keeps the chats, the journal, the queue and the limits."""
    if not config.cluster.url:
        return Engine(config)
    from engine.cluster.dispatch import NoLocalBackend, RemoteWorker

    return Engine(config, NoLocalBackend(), worker=RemoteWorker(config.cluster))


def build_adapters(engine: Engine, config: Config, stop: asyncio.Event) -> list[Adapter]:
    """Every adapter whose token is set; the console when none is (or when asked for)."""
    adapters: list[Adapter] = []
    if config.discord_token:
        from bot.discord_adapter import DiscordAdapter

        adapters.append(DiscordAdapter(engine, config))
    if config.telegram_token:
        from bot.telegram_adapter import TelegramAdapter

        adapters.append(TelegramAdapter(engine, config))
    mode = config.console.enabled
    if mode == "always" or (mode == "auto" and not adapters):
        from bot.console import ConsoleAdapter

        adapters.append(ConsoleAdapter(engine, on_quit=stop.set))
    return adapters


async def run_bot(config: Config, stop: asyncio.Event | None = None) -> int:
    """Run until Ctrl-C, SIGTERM or the console's /quit; the process's exit code: 2 when the
    console was the only adapter and its input was closed from the start (nothing served)."""
    stop = stop or asyncio.Event()
    _install_signal_handlers(stop)
    log.info("loading the %s backend…", "cluster" if config.cluster.url else config.engine.backend)
    async with make_engine(config) as engine:
        log.info("engine ready (load took %.1f s)", engine.load_seconds or 0.0)
        adapters = build_adapters(engine, config, stop)
        started: list[Adapter] = []
        try:
            for adapter in adapters:
                await adapter.start()
                started.append(adapter)
                log.info("%s adapter started", adapter.name)
            heartbeat = asyncio.create_task(beat(heartbeat_path(config)), name="heartbeat")
            try:
                await stop.wait()
            finally:
                heartbeat.cancel()
            log.info("shutting down: no new jobs; the running one may finish")
            await shut_down(engine, started, config.engine.shutdown_grace_s)
        finally:
            for adapter in reversed(started):
                try:
                    await adapter.stop()
                except Exception:
                    log.exception("stopping the %s adapter failed", adapter.name)
    nothing_served = len(started) == 1 and getattr(started[0], "closed_at_start", False)
    return 2 if nothing_served else 0


def heartbeat_path(config: Config) -> Path:
    """Beside the journal: ``doctor --quick`` (the container's health check) reads its age."""
    return Path(config.engine.database).parent / "heartbeat"


async def beat(path: Path) -> None:
    """Touch ``path`` every ``HEARTBEAT_S`` while the bot serves (its event loop is alive)."""
    while True:
        try:
            path.write_text(f"{time.time():.0f}\n")
        except OSError as exc:  # a read-only or full disk: the health check will say so
            log.warning("could not write the heartbeat %s: %s", path, exc)
        await asyncio.sleep(HEARTBEAT_S)


async def shut_down(engine: Engine, adapters: list[Adapter], grace_s: float) -> None:
    """One drain: the running image may finish, then the answers on their way (that image's
    too) are posted, all within the one grace; only then do the adapters stop."""
    deadline = time.monotonic() + grace_s
    await engine.drain(grace_s)
    left = max(ANSWER_FLOOR_S, deadline - time.monotonic())
    await asyncio.gather(*(adapter.finish_answers(left) for adapter in adapters))


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on the main thread
            pass
