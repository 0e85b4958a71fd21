"""The console adapter's commands (issue 15 rows 1 and 2): every command of the chat adapters
works, an unknown one is named instead of becoming an image, /cancel without an id cancels the
latest job."""

from __future__ import annotations

import io

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
