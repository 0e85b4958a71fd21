"""The console adapter's commands (issue 15 rows 1 and 2): every command of the chat adapters
works, an unknown one is named instead of becoming an image, /cancel without an id cancels the
latest job."""

from __future__ import annotations

import io

from bot import render
from bot.console import CONSOLE_USER, ConsoleAdapter
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
