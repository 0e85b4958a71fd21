"""Discord's /imagine with an attached picture (image-to-image), through the real discord.py
client against the fake Discord: the attachment option, its checks, and a restart."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from engine import input_image
from engine.png import read_parameters
from tests import test_discord_adapter as adapter_tests
from tests.fakes.discord_server import FakeDiscord
from tests.test_discord_adapter import ALICE, _text, final_upload, jobs_in_journal, private_answer
from tests.test_input_image import png_claiming

# the Discord adapter tests' fixtures, by name
server, dconfig, start_bot = adapter_tests.server, adapter_tests.dconfig, adapter_tests.start_bot


def picture(size: tuple[int, int] = (1600, 900), kind: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format=kind)
    return out.getvalue()


def downloads(server: FakeDiscord) -> list[str]:
    return [c.path for c in server.calls if c.name == "attachment_download"]


def inputs_of(dconfig) -> list[Path]:
    folder = input_image.inputs_folder(dconfig.engine.output_dir)
    return sorted(folder.glob("*.png")) if folder.exists() else []


async def test_an_attached_picture_is_image_to_image_at_its_shape(server, start_bot, dconfig):
    adapter = await start_bot()
    image = server.attachment(picture((1600, 900)), "fox.jpg", content_type="image/jpeg")
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 5",
                              image=image)
    upload = await final_upload(server, sent)
    await adapter.drain()

    calls = server.calls_for(sent)
    assert calls[0].json == {"type": 5}  # deferred before the download
    assert downloads(server) == [f"/attachments/{image.id}/fox.jpg"]
    job = (await jobs_in_journal(adapter, ALICE))[0]
    request = job.request
    assert (request.width, request.height, request.strength) == (1360, 768, 0.6)
    assert Path(request.init_image) == inputs_of(dconfig)[0]  # kept for a restart
    params = read_parameters(upload.files[0].data)
    assert (params["Size"], params["Denoising strength"], params["Seed"]) == (
        "1360x768", "0.6", "7")
    assert "strength 0.6" in _text(upload)


async def test_strength_and_aspect_given_win(server, start_bot):
    adapter = await start_bot()
    typed = await server.slash("imagine", ALICE, prompt="a fox --steps 1", strength=0.8,
                               aspect="1:1", image=server.attachment(picture((1600, 900))))
    await final_upload(server, typed)
    written = await server.slash("imagine", ALICE, prompt="a fox --steps 1 --strength 0.3",
                                 image=server.attachment(picture((600, 800), "PNG")))
    await final_upload(server, written)
    await adapter.drain()
    second, first = (j.request for j in await jobs_in_journal(adapter, ALICE))
    assert (first.strength, first.width, first.height) == (0.8, 1024, 1024)
    assert (second.strength, second.width, second.height) == (0.3, 608, 800)  # its own size


async def test_a_file_announced_too_big_is_refused_before_any_download(server, start_bot,
                                                                       dconfig):
    adapter = await start_bot()
    huge = server.attachment(picture(), size=50 * 1024 * 1024)
    sent = await server.slash("imagine", ALICE, prompt="a fox", image=huge)
    answer = await private_answer(server, sent)
    await adapter.drain()
    assert answer.name == "interaction_callback" and answer.json["type"] == 4  # not deferred
    assert "50.0 MB" in _text(answer) and "at most 10.0 MB" in _text(answer)
    assert downloads(server) == [] and await jobs_in_journal(adapter, ALICE) == []


async def test_not_an_image_or_a_bomb_gets_a_private_error_and_queues_nothing(
        server, start_bot, dconfig):
    adapter = await start_bot()
    for data, said in ((b"%PDF-1.7 not a picture", "not a PNG, JPEG or WebP"),
                       (png_claiming(100_000, 100_000), "too many pixels")):
        sent = await server.slash("imagine", ALICE, prompt="a fox",
                                  image=server.attachment(data, "x.png"))
        answer = await private_answer(server, sent)
        assert said in _text(answer)
        # deferred (public "thinking…"), removed, then the error only Alice sees
        assert [c.name for c in server.calls_for(sent)] == [
            "interaction_callback", "delete_original", "followup"]
    await adapter.drain()
    assert len(downloads(server)) == 2
    assert await jobs_in_journal(adapter, ALICE) == [] and inputs_of(dconfig) == []


async def test_strength_without_a_picture_is_refused_politely(server, start_bot):
    adapter = await start_bot()
    sent = await server.slash("imagine", ALICE, prompt="a fox --strength 0.5")
    answer = await private_answer(server, sent)
    assert "only works with an image" in _text(answer)
    assert await jobs_in_journal(adapter, ALICE) == []


async def test_a_refused_job_leaves_no_picture_behind(server, start_bot, dconfig):
    dconfig.rate_limit.images_per_window = 1
    adapter = await start_bot()
    first = await server.slash("imagine", ALICE, prompt="one --steps 1")
    await final_upload(server, first)
    sent = await server.slash("imagine", ALICE, prompt="two",
                              image=server.attachment(picture()))
    await private_answer(server, sent)
    await adapter.drain()
    assert len(await jobs_in_journal(adapter, ALICE)) == 1 and inputs_of(dconfig) == []


async def test_a_restart_before_it_runs_still_runs_it_from_the_kept_picture(
        server, start_bot, engine_factory, dconfig):
    restarted, post = await adapter_tests.posted_after_a_restart(
        server, start_bot, engine_factory, dconfig, ALICE, prompt="a fox --seed 3 --steps 2",
        image=server.attachment(picture((900, 1600))))
    record = (await jobs_in_journal(restarted, ALICE))[0]
    assert record.status == "finished" and Path(record.request.init_image).exists()
    params = read_parameters(post.files[0].data)
    assert (params["Size"], params["Denoising strength"]) == ("768x1360", "0.6")
    assert len(downloads(server)) == 1  # not downloaded again
