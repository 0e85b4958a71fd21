"""Telegram: a picture to start from (image-to-image), through the real python-telegram-bot
client against the fake Bot API: a photo or image file with /imagine as its caption, /imagine as
a reply to a photo, the checks on what was sent, and a restart before the job runs."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

from PIL import Image

from engine import input_image
from engine.backends.dry_run import DryRunBackend
from engine.config import Config
from engine.png import read_parameters
from tests import test_telegram_adapter as adapter_tests
from tests.fakes.telegram_server import BOT_USERNAME, FakeTelegramServer
from tests.test_input_image import png_claiming
from tests.test_telegram_adapter import (
    ALICE,
    GROUP,
    SETUP_CALLS,
    Starter,
    delivered,
    finished_job,
    reply_to,
    user,
)

# the Telegram adapter tests' fixtures, by name (the first two apply to every test here too)
_no_env_token, _keep_jobs = adapter_tests._no_env_token, adapter_tests._keep_jobs
tg, tg_config, start_bot = adapter_tests.tg, adapter_tests.tg_config, adapter_tests.start_bot


def picture(size: tuple[int, int] = (1600, 900), kind: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (30, 90, 200)).save(out, format=kind)
    return out.getvalue()


def downloads(tg: FakeTelegramServer) -> list[str]:
    return [c.params["path"] for c in tg.calls_to("file", ok_only=True)]


def inputs_of(config: Config) -> list[Path]:
    folder = input_image.inputs_folder(config.engine.output_dir)
    return sorted(folder.glob("*.png")) if folder.exists() else []


async def test_a_photo_captioned_imagine_starts_from_the_largest_size(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    engine, _ = await start_bot()
    sent = tg.photo(picture((1600, 900)), caption="/imagine a red fox --seed 7 --steps 5",
                    chat_id=ALICE, user_id=ALICE)
    photo = await tg.wait_for("sendPhoto")
    job = await finished_job(engine, ALICE)
    assert tg.calls_to("getFile")[0].params["file_id"] == f"photo-{sent['message_id']}"
    assert downloads(tg) == [f"photos/photo-{sent['message_id']}.jpg"]
    request = job.request
    assert (request.width, request.height, request.strength, request.seed) == (1360, 768, 0.6, 7)
    assert Path(request.init_image) == inputs_of(tg_config)[0]
    params = read_parameters(photo.upload("photo").data)
    assert (params["Size"], params["Denoising strength"]) == ("1360x768", "0.6")
    assert reply_to(photo) == sent["message_id"]
    await delivered(engine, job.id)


async def test_an_image_file_in_a_group_with_the_bots_name_and_a_strength(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    tg.photo(picture((500, 500), "PNG"), document="image/png", chat_id=GROUP, user_id=ALICE,
             caption="/imagine@OtherBot a cat --steps 1")  # another bot's: not ours to take
    tg.photo(picture((500, 500), "PNG"), document="image/png", chat_id=GROUP, user_id=ALICE,
             caption=f"/imagine@{BOT_USERNAME} a fox --steps 1 --strength 0.3")
    await tg.wait_for("sendPhoto")
    job = await finished_job(engine, ALICE)
    assert (job.request.prompt, job.request.strength) == ("a fox", 0.3)
    assert (job.request.width, job.request.height) == (496, 496)
    assert len(engine._jobs) == 1 and len(tg.calls_to("getFile")) == 1


async def test_imagine_as_a_reply_to_a_photo_starts_from_it(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    shared = tg.photo(picture((900, 1600)), chat_id=ALICE, user_id=ALICE)  # no caption: nothing
    command = tg.message("/imagine a fox --steps 2 --ar 1:1", chat_id=ALICE, user_id=ALICE,
                         reply_to=shared)
    photo = await tg.wait_for("sendPhoto")
    job = await finished_job(engine, ALICE)
    assert job.request.init_image and (job.request.width, job.request.height) == (1024, 1024)
    assert downloads(tg) == [f"photos/photo-{shared['message_id']}.jpg"]
    assert reply_to(photo) == command["message_id"] and len(engine._jobs) == 1


async def test_a_photo_announced_too_big_is_refused_before_any_download(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    engine, _ = await start_bot()
    tg.photo(picture(), caption="/imagine a fox", chat_id=ALICE, user_id=ALICE,
             file_size=30 * 1024 * 1024)
    reply = await tg.wait_for("sendMessage")
    assert reply.params["text"] == "⚠️ That image is 30.0 MB; please send one of at most 10.0 MB."
    assert tg.calls_to("getFile") == [] and downloads(tg) == []
    assert engine._jobs == {} and await engine.store.jobs_for_user(user(ALICE)) == []


async def test_not_an_image_or_a_bomb_gets_one_polite_reply_and_queues_nothing(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    engine, _ = await start_bot()
    tg.photo(b"<html>not a picture</html>", document="image/png", chat_id=ALICE, user_id=ALICE,
             caption="/imagine a fox")
    first = await tg.wait_for("sendMessage")
    tg.photo(png_claiming(100_000, 100_000), chat_id=ALICE, user_id=ALICE,
             caption="/imagine a fox")
    second = await tg.wait_for("sendMessage", 2)
    assert "not a PNG, JPEG or WebP" in first.params["text"]
    assert "too many pixels" in second.params["text"]
    assert tg.methods(ignore=(*SETUP_CALLS, "getFile", "file")) == ["sendMessage"] * 2
    assert engine._jobs == {} and inputs_of(tg_config) == []


async def test_strength_without_a_picture_is_a_polite_error(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    tg.message("/imagine a fox --strength 0.4", chat_id=ALICE, user_id=ALICE)
    reply = await tg.wait_for("sendMessage")
    assert "only works with an image" in reply.params["text"] and engine._jobs == {}


async def test_a_restart_before_it_runs_still_runs_it_from_the_kept_picture(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config, engine_factory: Any
        ) -> None:
    before = await engine_factory(tg_config, DryRunBackend())
    before.pause()  # the bot stops before the job runs
    _, adapter = await start_bot(engine=before)
    sent = tg.photo(picture((1600, 900)), caption="/imagine a fox --seed 4 --steps 2",
                    chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendMessage")  # "Queued": the job is in the journal
    await adapter.stop()
    await before.shutdown(grace_s=0)

    after = await engine_factory(tg_config, DryRunBackend())
    await start_bot(engine=after)
    photo = await tg.wait_for("sendPhoto")
    assert reply_to(photo) == sent["message_id"]
    params = read_parameters(photo.upload("photo").data)
    assert (params["Seed"], params["Size"], params["Denoising strength"]) == (
        "4", "1360x768", "0.6")
    await asyncio.sleep(0.1)
    assert len(downloads(tg)) == 1  # the kept file ran it; nothing was downloaded again
    assert len(inputs_of(tg_config)) == 1
