"""Discord and Telegram served at once by one engine: one queue, shared fairly between users."""

from __future__ import annotations

import asyncio

from bot.delivery import RetryPolicy
from bot.discord_adapter import DiscordAdapter
from bot.telegram_adapter import TelegramAdapter
from engine.png import read_parameters
from tests.fakes.discord_server import FakeDiscord, FakeUser
from tests.fakes.telegram_server import FakeTelegramServer

TG_TOKEN = "123456789:AAHfakeTokenForTests_abcdefghijklmnopq"
ALICE = FakeUser("111111111111111111", "alice")
BOB = FakeUser("222222222222222222", "bob")


async def wait_queued(engine, count: int) -> None:
    for _ in range(500):
        if engine.queued_count() >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {engine.queued_count()} of {count} jobs were queued")


async def test_one_queue_serves_both_platforms_round_robin(monkeypatch, config, engine_factory,
                                                           backend):
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    monkeypatch.delenv("TELEGRAM_TOKEN", raising=False)
    discord_fake = FakeDiscord()
    await discord_fake.start()
    discord_fake.patch(monkeypatch)
    async with FakeTelegramServer() as tg:
        config.discord.token = "fake-discord-token"
        config.telegram.token = TG_TOKEN
        config.telegram.base_url = tg.base_url
        config.telegram.base_file_url = tg.base_file_url
        config.telegram.progress_interval_s = 0.0
        engine = await engine_factory()
        engine.pause()
        discord = DiscordAdapter(engine, config, guild_ready_timeout=0.01,
                                 retry_policy=RetryPolicy(attempts=2, first_delay_s=0.01))
        telegram = TelegramAdapter(engine, config, poll_timeout_s=1)
        await discord.start()
        await telegram.start()
        try:
            # Alice (Discord) asks for three images first, then one user each arrives.
            for i in range(3):
                await discord_fake.slash("imagine", ALICE, prompt=f"d-alice-{i} --seed {i}")
                await wait_queued(engine, i + 1)
            tg.message("/imagine t-42 --seed 42", chat_id=42, user_id=42)
            await wait_queued(engine, 4)
            await discord_fake.slash("imagine", BOB, prompt="d-bob --seed 5")
            await wait_queued(engine, 5)
            tg.message("/imagine t-43 --seed 43", chat_id=-100, user_id=43)
            await wait_queued(engine, 6)
            engine.resume()
            photos = [await tg.wait_for("sendPhoto", 2, timeout=20)]
            await discord_fake.wait_for_count(
                lambda c: bool(c.files) and c.status == 200, 4, timeout=20)
        finally:
            await telegram.stop()
            await discord.stop()
            await discord_fake.close()
    order = [prompt for _, prompt in backend.order]
    assert order == ["d-alice-0", "t-42", "d-bob", "t-43", "d-alice-1", "d-alice-2"]
    assert backend.max_running == 1
    seeds = {read_parameters(c.files[0].data)["Seed"] for c in discord_fake.calls
             if c.files and c.status == 200}
    assert seeds == {"0", "1", "2", "5"}
    assert photos[0].method == "sendPhoto"
