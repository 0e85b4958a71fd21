"""The container set-up, checked without Docker (none here): the compose file's settings that
matter, the Dockerfile's health check, and the heartbeat it reads."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import yaml

from bot.app import beat, heartbeat_path
from bot.doctor import HEARTBEAT_STALE_S, check_heartbeat
from engine.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_compose_gives_the_gpu_volumes_restarts_and_time_to_finish_an_image():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    bot = compose["services"]["bot"]
    grace = load_config(ROOT / "config.example.toml").engine.shutdown_grace_s
    stop = bot["stop_grace_period"]
    assert stop.endswith("s") and float(stop[:-1]) > grace
    assert bot["restart"] == "unless-stopped"
    devices = bot["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    mounts = {v.split(":")[1] for v in bot["volumes"]}
    assert {"/srv/bot/models", "/srv/bot/data", "/srv/bot/outputs",
            "/srv/bot/config.toml"} <= mounts
    assert set(bot["environment"]) == {"DISCORD_TOKEN", "TELEGRAM_TOKEN"}


def test_the_dockerfile_caches_dependencies_checks_health_and_can_compile():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"apt-get install .*gcc", text)  # Triton needs a C compiler
    deps = text.index('pip install ".[cluster]"')  # a worker runs from the same image
    assert deps < text.index("COPY engine") < text.index("pip install --no-deps .")
    assert 'CMD ["python", "-m", "bot", "doctor", "--quick"]' in text
    assert "USER 10001" in text and "--stop-timeout" in text


def test_the_heartbeat_is_what_the_quick_doctor_reads(tmp_path):
    config = Config()
    config.engine.database = str(tmp_path / "bot.sqlite3")
    assert not check_heartbeat(config).ok  # not serving yet

    async def one_beat() -> None:
        task = asyncio.create_task(beat(heartbeat_path(config)))
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(one_beat())
    assert check_heartbeat(config).ok
    stale = check_heartbeat(config, now=time.time() + HEARTBEAT_STALE_S + 1)
    assert not stale.ok and "not answering" in stale.detail
