"""The NSFW check's policies through the real discord.py client and the fake Discord: spoiler
attachments, blocked images left out (and a result held back entirely answered politely and
journalled as delivered), per image in a grid and on U. The detector is faked at its boundary
(``tests/fakes/detector.py``): the dry-run placeholders are not nudes."""

from __future__ import annotations

import pytest

from bot import render
from engine import moderation
from tests import test_discord_adapter as base
from tests.fakes.detector import FakeDetector
from tests.test_discord_adapter import ALICE, _text, final_upload, jobs_in_journal, post_grid

# the Discord adapter tests' fixtures: the fake Discord, the config, the adapter
server, dconfig, start_bot = base.server, base.dconfig, base.start_bot


@pytest.fixture
def detector(dconfig, monkeypatch) -> FakeDetector:
    """The check on, with a fake NudeNet that flags seed 6 (and seeds the test adds)."""
    fake = FakeDetector(6)
    monkeypatch.setattr(moderation, "load_nudenet", lambda: fake)
    dconfig.moderation.nsfw_check = True
    return fake


async def test_spoiler_marks_only_the_flagged_files_of_a_grid(server, start_bot, dconfig,
                                                              detector):
    dconfig.moderation.policy = "spoiler"
    adapter = await start_bot()
    sent, upload, job = await post_grid(server, adapter)
    await adapter.drain()

    assert [f.filename for f in upload.files] == [
        f"{job}-5.png", f"SPOILER_{job}-6.png", f"{job}-7.png", f"{job}-8.png"]
    assert detector.checked == [5, 6, 7, 8]
    assert "not posted" not in _text(upload)
    record = await adapter.engine.job_record(job)
    assert record.delivered_to.startswith("discord:channel/")


async def test_a_blocked_image_is_not_posted_and_its_user_is_told(server, start_bot, dconfig,
                                                                  detector, caplog):
    adapter = await start_bot()
    sent = await server.slash("imagine", ALICE, prompt="a fox --seed 6 --steps 1")
    notice = await server.wait_for(lambda c: c.token == sent.token
                                   and _text(c) == render.blocked(1))
    await adapter.drain()

    assert not any(c.files for c in server.calls_for(sent)), "no image went out"
    assert notice.json.get("components") in (None, [])  # no buttons under a notice
    [record] = await jobs_in_journal(adapter, ALICE)
    assert record.delivered_at is not None and record.delivered_to.startswith(
        "blocked:discord:channel/")
    assert await adapter.engine.store.undelivered_jobs() == [], "never retried"
    assert any(f"job {record.job_id}: image 1/1 flagged" in r.getMessage()
               and "not posted (blocked)" in r.getMessage() for r in caplog.records)


async def test_a_blocked_image_of_a_grid_is_left_out_and_u_refuses_it(server, start_bot,
                                                                      detector):
    adapter = await start_bot()
    sent, upload, job = await post_grid(server, adapter)
    assert [f.filename for f in upload.files] == [f"{job}-{s}.png" for s in (5, 7, 8)]
    assert "Image 2 was not posted (held back by the bot's image check)." in _text(upload)

    press = await server.click(server.original(sent)["id"], f"imagine:u:{job}:2", ALICE)
    answer = await server.wait_for(lambda c: c.token == press.token
                                   and _text(c) == render.blocked_alone(2))
    assert not answer.files
    press = await server.click(server.original(sent)["id"], f"imagine:u:{job}:3", ALICE)
    alone = await final_upload(server, press)
    assert [f.filename for f in alone.files] == [f"{job}-7.png"]
    await adapter.drain()


async def test_a_servers_own_policy_wins_and_a_dm_keeps_the_default(server, start_bot,
                                                                    dconfig, detector):
    dconfig.moderation.policy = "spoiler"
    dconfig.moderation.discord_guilds = {server.guild_id: "allow"}
    detector.seeds.add(9)
    adapter = await start_bot()
    in_guild = await server.slash("imagine", ALICE, prompt="a fox --seed 9 --steps 1")
    assert [f.filename for f in (await final_upload(server, in_guild)).files] == [
        f"{(await jobs_in_journal(adapter, ALICE))[0].job_id}-9.png"]
    direct = await server.slash("imagine", ALICE, guild=False, prompt="a fox --seed 9 --steps 1")
    [file] = (await final_upload(server, direct)).files
    assert file.filename.startswith("SPOILER_")
    await adapter.drain()
