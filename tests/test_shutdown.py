"""SIGTERM mid-job: no new jobs, the running one finishes within the grace period, clean exit."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_bot(folder: Path, grace: float) -> subprocess.Popen[str]:
    (folder / "config.toml").write_text(
        f'[engine]\nbackend = "dry-run"\ndry_run_step_s = 0.1\nshutdown_grace_s = {grace}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("DISCORD_TOKEN", None)
    env.pop("TELEGRAM_TOKEN", None)
    return subprocess.Popen([sys.executable, "-m", "bot", "run"], cwd=folder, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 60) -> list[str]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} not printed; got {seen}")


def journal(folder: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(folder / "data" / "bot.sqlite3") as db:
        return db.execute("SELECT job_id, status FROM jobs ORDER BY seq").fetchall()


def sigterm_mid_job(folder: Path, grace: float, commands: str) -> str:
    """Start the bot, send ``commands``, SIGTERM it once a job is drawing; its output."""
    proc = start_bot(folder, grace=grace)
    proc.stdin.write(commands)  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    wait_for_line(proc, "step ")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out


def test_sigterm_lets_the_running_job_finish(tmp_path):
    out = sigterm_mid_job(tmp_path, 30,
                          "/imagine a slow fox --steps 20 --seed 3\n/imagine queued --steps 2\n")
    assert "saved to" in out  # the running job completed and was delivered
    statuses = [status for _, status in journal(tmp_path)]
    assert statuses == ["finished", "queued"]  # the waiting one runs after the next start


def test_sigterm_past_grace_leaves_the_job_for_the_next_start(tmp_path):
    out = sigterm_mid_job(tmp_path, 0.2, "/imagine a very slow fox --steps 50\n")
    assert "saved to" not in out
    # put back in line in the journal (lifecycle: running -> queued on a shutdown)
    assert [status for _, status in journal(tmp_path)] == ["queued"]
    # The next start re-queues it and the console delivers it.
    again = start_bot(tmp_path, grace=30)
    wait_for_line(again, "saved to", timeout=60)
    again.send_signal(signal.SIGTERM)
    again.communicate(timeout=60)
    assert [status for _, status in journal(tmp_path)] == ["finished"]
