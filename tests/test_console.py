"""The console adapter's commands (issue 15 rows 1 and 2): every command of the chat adapters
works, an unknown one is named instead of becoming an image, /cancel without an id cancels the
latest job."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from bot import render
from bot.console import CONSOLE_USER, ConsoleAdapter
from engine.errors import InvalidCommand
from engine.request import User
from engine.store import UNLIMITED


async def console(engine_factory):  # type: ignore[no-untyped-def]
    engine = await engine_factory()
    out = io.StringIO()
    return engine, ConsoleAdapter(engine, stdin=io.StringIO(), stdout=out), out


async def test_admin_and_unknown_commands_never_become_images(engine_factory, backend):
    engine, adapter, out = await console(engine_factory)
    for line in ("/pause", "/limit telegram:42 2", "/foo bar", "/resume"):
        await adapter.handle_line(line)
    text = out.getvalue()
    assert render.queue_paused() in text and render.queue_resumed() in text
    assert render.limit_set("telegram:42", 2) in text
    assert "I do not know /foo" in text and "/pause" in text
    assert backend.order == [] and engine.queued_count() == 0  # no image was queued
    assert (await engine.quota(User("telegram", "42"))).limit == 2
    await adapter.handle_line("/limit discord:7 unlimited")
    assert await engine.store.get_limit_override(User("discord", "7")) == UNLIMITED
    await adapter.handle_line("/limit someone 2")
    assert "Usage: /limit <discord|telegram>:<user id>" in out.getvalue()


async def test_cancel_without_an_id_cancels_the_latest_job(engine_factory):
    engine, adapter, out = await console(engine_factory)
    await adapter.handle_line("/pause")
    first = await adapter.imagine("/imagine a fox --steps 1")
    second = await adapter.imagine("a plain prompt --steps 1")  # a plain line is a prompt
    await adapter.handle_line("/cancel")
    assert render.cancelling(second.id) in out.getvalue()
    assert [j.id for j in engine.jobs_of(CONSOLE_USER)] == [first.id]
    await adapter.handle_line("/cancel")
    await adapter.handle_line("/cancel")
    assert render.queue_list([]) in out.getvalue()
    await adapter.stop()


async def test_n_4_saves_four_pngs_whose_parameters_carry_consecutive_seeds(engine_factory):
    """Issue 12's acceptance: /imagine a fox --seed 5 --n 4 --steps 4 with the dry-run
    backend saves four PNGs with seeds 5, 6, 7, 8."""
    from pathlib import Path

    from engine.png import read_parameters

    engine, adapter, out = await console(engine_factory)
    job = await adapter.imagine("/imagine a fox --seed 5 --n 4 --steps 4")
    await adapter.followers.wait_all()
    paths = [line.rsplit("saved to ", 1)[1] for line in out.getvalue().splitlines()
             if f"[{job.id}] saved to" in line]
    assert len(paths) == 4
    seeds = [read_parameters(Path(p).read_bytes())["Seed"] for p in paths]
    assert seeds == ["5", "6", "7", "8"]
    assert "4 images, seeds 5–8" in out.getvalue()
    # one journal row for the job, charged as four images
    assert (await engine.quota(CONSOLE_USER)).used == 4


async def test_vary_starts_from_the_chosen_image_with_a_new_seed(engine_factory, backend):
    from engine.png import read_parameters

    engine, adapter, out = await console(engine_factory)
    grid = await adapter.imagine("/imagine a fox --seed 5 --n 2 --steps 4")
    await adapter.followers.wait_all()
    await adapter.handle_line(f"/vary {grid.id} 2 strong")
    await adapter.followers.wait_all()
    [vary] = [j for j in await engine.store.jobs_for_user(CONSOLE_USER) if j.job_id != grid.id]
    assert vary.request.init_image.endswith(f"{grid.id}-6.png")
    assert vary.request.strength == engine.config.limits.vary_strong_strength
    assert vary.request.seed != 6 and vary.request.count == 1
    params = read_parameters(open(vary.result_path, "rb").read())
    assert params["Seed"] == str(vary.request.seed)
    assert f"variation (strong) of {grid.id} #2" in out.getvalue()
    with pytest.raises(InvalidCommand, match="pick 1 to 2"):  # the reader shows it politely
        await adapter.handle_line(f"/vary {grid.id} 3")
    await adapter.handle_line("/vary nosuchjob 1")
    assert render.vary_needs_a_finished_job() in out.getvalue()


async def test_image_option_starts_from_a_local_picture(engine_factory, backend, tmp_path):
    """``--image FILE`` is the console's attachment: the same checks and image-to-image
    request as a picture sent in a chat, so every action can be tried without a chat token."""
    from PIL import Image

    from engine.png import read_parameters

    photo = tmp_path / "my photo.jpg"
    Image.new("RGB", (1200, 800), (30, 120, 200)).save(photo, "JPEG")
    engine, adapter, out = await console(engine_factory)
    job = await adapter.imagine(f'/imagine a fox --seed 3 --steps 10 --image "{photo}" '
                                "--strength 0.5")
    await adapter.followers.wait_all()
    [record] = await engine.store.jobs_for_user(CONSOLE_USER)
    request = record.request
    assert record.job_id == job.id and record.status == "finished"
    assert request.prompt == "a fox" and request.strength == 0.5 and request.steps == 10
    assert request.width / request.height == pytest.approx(1.5, rel=0.05)  # the picture's shape
    saved = Image.open(request.init_image)
    assert saved.size == (request.width, request.height) and saved.getpixel((5, 5))[2] > 150
    assert read_parameters(open(record.result_path, "rb").read())["Seed"] == "3"


async def test_a_missing_or_unfit_local_picture_is_refused_in_a_sentence(engine_factory, tmp_path):
    engine, adapter, out = await console(engine_factory)
    with pytest.raises(InvalidCommand, match="no file at"):
        await adapter.imagine(f"/imagine a fox --image {tmp_path / 'nope.png'}")
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(InvalidCommand, match="not a PNG, JPEG or WebP"):
        await adapter.imagine(f"/imagine a fox --image {tmp_path / 'notes.txt'}")
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(engine.config.limits.input_max_bytes))
    with pytest.raises(InvalidCommand, match="please send one of at most"):
        await adapter.imagine(f"/imagine a fox --image {big}")
    with pytest.raises(InvalidCommand, match="--strength only works with an image"):
        await adapter.imagine("/imagine a fox --strength 0.5")
    for line in ("/imagine a fox --image", f"/imagine a fox --image {big} --image {big}",
                 "/imagine a fox --image --seed 3"):
        with pytest.raises(InvalidCommand, match="give --image once"):
            await adapter.imagine(line)
    with pytest.raises(InvalidCommand, match="could not read"):  # expanduser cannot
        await adapter.imagine("/imagine a fox --image=~no-such-user-here/a.png")
    assert engine.queued_count() == 0 and not await engine.store.jobs_for_user(CONSOLE_USER)
    # nothing was kept for the refused pictures
    assert not list(Path(engine.config.engine.output_dir, "inputs").glob("*"))
