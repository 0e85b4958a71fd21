"""The load test's bot process: ``python -m bot`` with discord.py pointed at a fake Discord.

    python -m bench.load_bot_launcher --discord-api http://127.0.0.1:PORT/api/v10 \\
        --discord-gateway ws://127.0.0.1:PORT/gateway run --config load.toml

discord.py has no setting for its REST base or its gateway; both are class attributes
(``discord.http.Route.BASE``, ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY``), so this sets
them and then hands over to ``bot.__main__.main`` unchanged: the process under test is the real
bot, signals and all. Telegram needs no patch: its fake's address is ``telegram.base_url``.
``BotProcess`` starts, watches and ends one life of that process from the load test's side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def patch_discord(api_base: str, gateway: str) -> None:
    import discord
    import yarl

    discord.http.Route.BASE = api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_bot_launcher",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--discord-api", required=True, metavar="URL")
    parser.add_argument("--discord-gateway", required=True, metavar="URL")
    args, bot_argv = parser.parse_known_args(argv)
    patch_discord(args.discord_api, args.discord_gateway)
    from bot.__main__ import main as bot_main

    return bot_main(bot_argv)


def process_memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB (Linux /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


class BotProcess:
    """One life of the bot under test, as seen from the load test."""

    def __init__(self, config: Path, discord_api: str, discord_gateway: str, log: Path) -> None:
        self.config, self.log = config, log
        self.discord = ["--discord-api", discord_api, "--discord-gateway", discord_gateway]
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0

    async def start(self, ready: Callable[[], bool], timeout: float = 60.0) -> None:
        """Start the process; return once ``ready()`` (polled) says it serves both platforms."""
        env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "TELEGRAM_TOKEN")}
        self.started_at = time.monotonic()
        with open(self.log, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.load_bot_launcher", *self.discord,
                "run", "--config", str(self.config),
                cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bot did not start; see {self.log}")
            await asyncio.sleep(0.05)

    def memory_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the bot process, in KiB."""
        assert self.proc is not None
        return process_memory_kib(self.proc.pid)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the bot's clean shutdown); SIGKILL if it takes longer than ``timeout``."""
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
            return None


if __name__ == "__main__":
    sys.exit(main())
