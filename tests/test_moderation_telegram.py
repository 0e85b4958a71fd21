"""The NSFW check's policies through python-telegram-bot and the fake Bot API: ``has_spoiler``
on a photo and on album items, blocked images left out (a result held back entirely answered
politely and journalled as delivered), per image in a grid and on U. The detector is faked at
its boundary (``tests/fakes/detector.py``): the dry-run placeholders are not nudes."""

from __future__ import annotations

import pytest

from bot import render
from engine import moderation
from tests import test_telegram_adapter as base
from tests.fakes.detector import FakeDetector
from tests.fakes.telegram_server import FakeTelegramServer
from tests.test_telegram_adapter import (
    ALICE,
    GROUP,
    Starter,
    buttons,
    delivered,
    finished_job,
    post_grid,
    seeds_of,
)

# the Telegram adapter tests' fixtures: the fake Bot API, the config, the adapter
tg, tg_config, start_bot = base.tg, base.tg_config, base.start_bot
_no_env_token, _keep_jobs = base._no_env_token, base._keep_jobs


@pytest.fixture
def detector(tg_config, monkeypatch) -> FakeDetector:
    """The check on, with a fake NudeNet that flags seed 6 (and seeds the test adds)."""
    fake = FakeDetector(6)
    monkeypatch.setattr(moderation, "load_nudenet", lambda: fake)
    tg_config.moderation.nsfw_check = True
    return fake


async def test_spoiler_hides_the_photo_and_the_flagged_album_items(
        tg: FakeTelegramServer, start_bot: Starter, tg_config, detector) -> None:
    tg_config.moderation.policy = "spoiler"
    tg_config.telegram.send_png_document = True
    engine, _ = await start_bot()
    tg.message("/imagine a fox --seed 6 --steps 1", chat_id=ALICE, user_id=ALICE)
    photo = await tg.wait_for("sendPhoto")
    assert photo.json("has_spoiler") is True
    job = await finished_job(engine, ALICE)
    await delivered(engine, job.id)

    grid, _, _ = await post_grid(tg, engine)
    album = tg.calls_to("sendMediaGroup")[-1]
    assert seeds_of(album) == ["5", "6", "7", "8"]
    assert [bool(item.get("has_spoiler")) for item, _ in album.media()] == [
        False, True, False, False]
    # a PNG document cannot be hidden: none goes for a result with a flagged image
    assert tg.calls_to("sendDocument") == []


async def test_a_blocked_image_is_not_posted_and_its_user_is_told(
        tg: FakeTelegramServer, start_bot: Starter, detector) -> None:
    engine, _ = await start_bot()
    tg.message("/imagine a fox --seed 6 --steps 1", chat_id=ALICE, user_id=ALICE)
    notice = await tg.wait_for("editMessageText", where=lambda c: c.params["text"]
                               == render.blocked(1))
    job = await finished_job(engine, ALICE)
    record = await delivered(engine, job.id)
    assert tg.calls_to("sendPhoto") == [] and tg.calls_to("sendDocument") == []
    assert buttons(notice) == []
    assert record.delivered_to == f"blocked:telegram:{ALICE}/{notice.params['message_id']}"
    assert await engine.store.undelivered_jobs() == [], "never retried"


async def test_a_blocked_image_of_a_grid_is_left_out_and_u_refuses_it(
        tg: FakeTelegramServer, start_bot: Starter, detector) -> None:
    engine, _ = await start_bot()
    job, _, keys = await post_grid(tg, engine)
    album = tg.calls_to("sendMediaGroup")[0]
    assert seeds_of(album) == ["5", "7", "8"]
    caption = album.media()[0][0]["caption"]
    assert caption.endswith("Image 2 was not posted (held back by the bot's image check).")
    tg.press(keys, f"u:{job.id}:2", user_id=ALICE)
    answer = await tg.wait_for("answerCallbackQuery")
    assert answer.params["text"] == render.blocked_alone(2)
    assert tg.calls_to("sendDocument") == []


async def test_a_grid_with_one_image_left_posts_it_alone_then_its_buttons(
        tg: FakeTelegramServer, start_bot: Starter, detector) -> None:
    detector.seeds = {5, 7}  # image 2 (seed 6) alone is left
    engine, _ = await start_bot()
    job, _, keys = await post_grid(tg, engine, "a fox --n 3 --seed 5")
    assert tg.calls_to("sendMediaGroup") == []  # an album needs two
    [photo] = tg.calls_to("sendPhoto")
    assert photo.upload("photo").filename == f"{job.id}-6.png"
    assert "Images 1, 3 were not posted" in photo.params["caption"]
    ids = [b["callback_data"] for row in keys["reply_markup"]["inline_keyboard"] for b in row]
    assert ids[:3] == [f"u:{job.id}:{n}" for n in (1, 2, 3)]


async def test_a_groups_own_policy_wins_over_the_default(
        tg: FakeTelegramServer, start_bot: Starter, tg_config, detector) -> None:
    tg_config.moderation.telegram_chats = {str(GROUP): "spoiler"}
    engine, _ = await start_bot()
    tg.message("/imagine a fox --seed 6 --steps 1", chat_id=GROUP, user_id=ALICE,
               chat_type="supergroup")
    photo = await tg.wait_for("sendPhoto")
    assert photo.json("has_spoiler") is True
