"""The Discord adapter end to end: the real discord.py client against a fake Discord on 127.0.0.1.

Each test starts the fake (REST + gateway), an engine on the dry-run backend and the adapter; it
then sends interactions over the fake gateway and asserts the HTTP calls the real client made.
"""

from __future__ import annotations

import asyncio

import pytest

from bot import render
from bot.delivery import RetryPolicy
from bot.discord_adapter import DiscordAdapter
from engine.backends.dry_run import DryRunBackend
from engine.job import JobStatus
from engine.png import read_parameters
from tests.fakes.discord_server import Call, FakeDiscord, FakeUser, SentInteraction

ALICE = FakeUser("111111111111111111", "alice")
BOB = FakeUser("222222222222222222", "bob")
ADMIN = FakeUser("333333333333333333", "admin")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
async def server(monkeypatch):
    fake = FakeDiscord()
    await fake.start()
    fake.patch(monkeypatch)
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    yield fake
    await fake.close()


@pytest.fixture
def dconfig(config):
    config.discord.token = "fake-discord-token"
    config.discord.progress_interval_s = 0.05
    config.access.discord_admins = [ADMIN.id]
    return config


@pytest.fixture
async def start_bot(server, dconfig, engine_factory):
    """Start an adapter (and an engine unless one is given); both are stopped at the end."""
    adapters: list[DiscordAdapter] = []

    async def start(cfg=None, *, engine=None, backend=None, **options) -> DiscordAdapter:
        cfg = cfg or dconfig
        engine = engine or await engine_factory(cfg, backend)
        options.setdefault("retry_policy", RetryPolicy(attempts=3, first_delay_s=0.01))
        adapter = DiscordAdapter(engine, cfg, guild_ready_timeout=0.01, **options)
        await adapter.start()
        adapters.append(adapter)
        return adapter

    yield start
    for adapter in adapters:
        await adapter.stop()


def is_final(call: Call) -> bool:
    return bool(call.files)


async def finished_upload(server: FakeDiscord, sent: SentInteraction) -> Call:
    return await server.wait_for(lambda c: c.token == sent.token and c.files and c.status == 200)


async def test_imagine_acks_edits_progress_and_uploads_png_with_parameters(server, start_bot):
    adapter = await start_bot(backend=DryRunBackend(step_seconds=0.1))
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 4")
    final = await finished_upload(server, sent)
    await adapter.drain()

    calls = server.calls_for(sent)
    assert [c.name for c in calls][0] == "interaction_callback"
    assert calls[0].json == {"type": 5}  # "thinking…", public
    edits = calls[1:]
    assert all(c.name == "edit_original" for c in edits)
    assert edits[-1] is final and not any(c.files for c in edits[:-1])
    print([c.content for c in edits])
    assert len(edits) >= 3
    png = final.files[0].data
    assert png.startswith(PNG_SIGNATURE)
    params = read_parameters(png)
    assert params["Seed"] == "7" and params["Steps"] == "4" and params["prompt"] == "a red fox"
