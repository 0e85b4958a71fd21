"""The Discord adapter end to end: the real discord.py client against a fake Discord on 127.0.0.1.

Each test starts the fake (REST + gateway), an engine on the dry-run backend and the adapter; it
then sends interactions over the fake gateway and asserts the HTTP calls the real client made.
"""

from __future__ import annotations

import asyncio
import logging
import time

import discord
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot import render
from bot.delivery import RetryPolicy
from bot.discord_adapter import DiscordAdapter
from bot.discord_reply import result_caption
from engine.backends.dry_run import DryRunBackend
from engine.grammar import clean_prompt
from engine.job import JobResult, JobStatus
from engine.pending import PendingInteraction
from engine.png import read_parameters
from engine.request import ImageRequest, Source, User
from tests.fakes.discord_server import Call, FakeDiscord, FakeUser, SentInteraction
from tests.fakes.discord_server import pings_of as fake_pings

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


def user_of(fake: FakeUser) -> User:
    return User("discord", fake.id, fake.name)


async def final_upload(server: FakeDiscord, sent: SentInteraction) -> Call:
    """The successful upload of the image for this interaction."""
    return await server.wait_for(lambda c: c.token == sent.token and bool(c.files)
                                 and c.status == 200)


async def private_answer(server: FakeDiscord, sent: SentInteraction) -> Call:
    """The first ephemeral message answering this interaction (callback or follow-up)."""
    call = await server.wait_for(
        lambda c: c.token == sent.token and _flags(c) & 64 and c.status == 200)
    return call


def _flags(call: Call) -> int:
    payload = call.json or {}
    return (payload.get("data") or payload).get("flags") or 0


def _text(call: Call) -> str:
    payload = call.json or {}
    return (payload.get("data") or payload).get("content") or ""


def _custom_ids(call: Call) -> list[str]:
    payload = call.json or {}
    rows = (payload.get("data") or payload).get("components") or []
    return [c["custom_id"] for row in rows for c in row["components"]]


async def jobs_in_journal(adapter: DiscordAdapter, user: FakeUser):
    return await adapter.engine.store.jobs_for_user(user_of(user))


# -- the done-when story ------------------------------------------------------------------------
async def test_imagine_acks_edits_progress_and_uploads_png_with_parameters(server, start_bot,
                                                                           dconfig):
    dconfig.discord.progress_interval_s = 0.25
    adapter = await start_bot(backend=DryRunBackend(step_seconds=0.15))
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 4")
    final = await final_upload(server, sent)
    await adapter.drain()

    calls = server.calls_for(sent)
    # 1. the acknowledgement: a public "thinking…" deferral, before anything else
    assert calls[0].name == "interaction_callback" and calls[0].json == {"type": 5}
    # 2. progress: JSON edits of @original, the first one bringing the Cancel button
    edits = calls[1:]
    assert [c.name for c in edits] == ["edit_original"] * len(edits)
    progress, upload = edits[:-1], edits[-1]
    assert upload is final and not any(c.files for c in progress) and len(progress) >= 2
    job = (await jobs_in_journal(adapter, ALICE))[0]
    assert _custom_ids(progress[0]) == [f"imagine:cancel:{job.job_id}"]
    steps = [int(t.split("step ")[1].split("/")[0]) for t in map(_text, progress) if "step" in t]
    assert steps == sorted(steps) and steps and all(s <= 4 for s in steps)
    gaps = [b.at - a.at for a, b in zip(progress, progress[1:], strict=False)]
    assert all(gap >= 0.2 for gap in gaps), gaps  # throttled to progress_interval_s
    # 3. the result: the PNG with its parameters, the caption, the buttons, no pings
    png = upload.files[0].data
    assert png.startswith(PNG_SIGNATURE)
    params = read_parameters(png)
    assert (params["Seed"], params["Steps"], params["prompt"]) == ("7", "4", "a red fox")
    assert upload.files[0].filename == f"{job.job_id}-7.png"
    assert "seed 7 · 4 steps" in _text(upload) and "asked by alice" in _text(upload)
    assert _custom_ids(upload) == [f"imagine:reroll:{job.job_id}", f"imagine:more:{job.job_id}",
                                   f"imagine:v:{job.job_id}:1:s", f"imagine:v:{job.job_id}:1:t",
                                   f"imagine:up:{job.job_id}:1"]
    assert all(c.json["allowed_mentions"]["parse"] == [] for c in edits)
    record = await adapter.engine.job_record(job.job_id)
    message_id = server.original(sent)["id"]
    assert record.delivered_to == f"discord:channel/{server.channel_id}/message/{message_id}"


async def test_bad_input_gets_one_private_error_and_queues_nothing(server, start_bot):
    adapter = await start_bot()
    sent = await server.slash("imagine", ALICE, prompt="a red fox --steps 1e9")
    answer = await private_answer(server, sent)
    await adapter.drain()
    assert server.calls_for(sent) == [answer]
    assert answer.name == "interaction_callback" and answer.json["type"] == 4
    assert _text(answer).startswith("⚠️") and "steps" in _text(answer)
    assert await jobs_in_journal(adapter, ALICE) == []


async def test_rate_limited_user_is_told_privately_after_the_deferral(server, start_bot, dconfig):
    dconfig.rate_limit.images_per_window = 1
    adapter = await start_bot()
    first = await server.slash("imagine", ALICE, prompt="first --seed 1 --steps 1")
    await final_upload(server, first)
    second = await server.slash("imagine", ALICE, prompt="second --seed 2 --steps 1")
    answer = await private_answer(server, second)
    await adapter.drain()
    # deferred at once (public "thinking…"), then removed, then the error only Alice sees
    assert [c.name for c in server.calls_for(second)] == [
        "interaction_callback", "delete_original", "followup"]
    assert answer.name == "followup" and "1 image" in _text(answer)
    assert [j.request.prompt for j in await jobs_in_journal(adapter, ALICE)] == ["first"]


async def test_reroll_queues_a_new_job_with_a_new_seed(server, start_bot):
    adapter = await start_bot()
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 4")
    await final_upload(server, sent)
    job_id = (await jobs_in_journal(adapter, ALICE))[0].job_id
    message_id = server.original(sent)["id"]

    reroll = await server.click(message_id, f"imagine:reroll:{job_id}", ALICE)
    upload = await final_upload(server, reroll)
    more = await server.click(message_id, f"imagine:more:{job_id}", ALICE)
    more_upload = await final_upload(server, more)
    await adapter.drain()

    newest, rerolled, original = await jobs_in_journal(adapter, ALICE)
    assert original.job_id == job_id
    assert rerolled.request.prompt == "a red fox" and rerolled.request.steps == 4
    assert rerolled.request.seed != 7
    assert read_parameters(upload.files[0].data)["Seed"] == str(rerolled.request.seed)
    assert (newest.request.seed, newest.request.steps) == (7, 14)  # same seed, more steps
    assert read_parameters(more_upload.files[0].data)["Steps"] == "14"
    assert server.calls_for(reroll)[0].json == {"type": 5}


async def test_a_strangers_press_is_refused_privately(server, start_bot):
    adapter = await start_bot()
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 1")
    await final_upload(server, sent)
    job_id = (await jobs_in_journal(adapter, ALICE))[0].job_id

    press = await server.click(server.original(sent)["id"], f"imagine:reroll:{job_id}", BOB)
    answer = await private_answer(server, press)
    await adapter.drain()
    assert server.calls_for(press) == [answer]
    assert _text(answer) == render.not_your_job()
    assert await jobs_in_journal(adapter, BOB) == []
    assert len(await jobs_in_journal(adapter, ALICE)) == 1


async def test_a_429_on_the_upload_is_retried_after_retry_after(server, start_bot):
    adapter = await start_bot()
    server.rate_limit_next("edit_original", retry_after=0.3, when=lambda c: bool(c.files))
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 2")
    await final_upload(server, sent)
    await adapter.drain()
    uploads = [c for c in server.calls_for(sent) if c.files]
    assert [c.status for c in uploads] == [429, 200]
    assert uploads[1].at - uploads[0].at >= 0.3  # the client waited as Discord asked
    assert uploads[0].files[0].data == uploads[1].files[0].data
    record = (await jobs_in_journal(adapter, ALICE))[0]
    assert record.delivered_at is not None



async def test_a_5xx_on_the_upload_is_retried(server, start_bot):
    adapter = await start_bot()
    server.fail_next("edit_original", 502, when=lambda c: bool(c.files))
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 1")
    await final_upload(server, sent)
    await adapter.drain()
    assert [c.status for c in server.calls_for(sent) if c.files] == [502, 200]
    assert (await jobs_in_journal(adapter, ALICE))[0].delivered_at is not None


async def test_a_dropped_connection_on_the_upload_is_retried_with_backoff(server, start_bot):
    adapter = await start_bot()
    server.drop_next("edit_original", when=lambda c: bool(c.files))
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 1")
    await final_upload(server, sent)
    await adapter.drain()
    assert [c.status for c in server.calls_for(sent) if c.files] == [0, 200]
    record = (await jobs_in_journal(adapter, ALICE))[0]
    assert record.delivered_at is not None and record.delivery_attempts >= 1
    assert "Disconnected" in record.last_delivery_error  # journaled while it was retried


async def test_a_result_the_bot_may_not_post_is_kept_undelivered(server, start_bot,
                                                                engine_factory, dconfig):
    first = await start_bot()
    first.engine.pause()
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 1")
    await server.wait_for(lambda c: c.token == sent.token and c.name == "edit_original")
    await first.stop()
    await first.engine.shutdown(grace_s=0)
    server.fail_next("channel_message", 403, {"message": "Missing Access", "code": 50001},
                     times=5)  # e.g. the bot was removed from the channel

    restarted = await start_bot(engine=await engine_factory(dconfig))
    await server.wait_for(lambda c: c.name == "channel_message")
    await restarted.drain()
    record = (await jobs_in_journal(restarted, ALICE))[0]
    assert record.status == "finished" and record.delivered_at is None
    assert "403" in record.last_delivery_error
    assert len([c for c in server.calls if c.name == "channel_message"]) == 1  # no retry loop
    assert [j.job_id for j in await restarted.engine.store.undelivered_jobs("discord")] == [
        record.job_id]


async def test_after_the_token_lifetime_the_result_goes_to_the_channel(server, start_bot):
    adapter = await start_bot(clock=lambda: time.time() + 15 * 60)
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 1")
    post = await server.wait_for(lambda c: c.name == "channel_message")
    await adapter.drain()
    assert [c.name for c in server.calls_for(sent)] == ["interaction_callback"]  # no edits
    assert post.pings == {f"user:{ALICE.id}"} and post.files


async def test_imagine_works_in_a_direct_message(server, start_bot, caplog):
    caplog.set_level(logging.DEBUG)
    adapter = await start_bot()
    sent = await server.slash("imagine", ALICE, guild=False, channel_id="600000000000000001",
                              prompt="a red fox --seed 7 --steps 1")
    upload = await final_upload(server, sent)
    await adapter.drain()
    assert read_parameters(upload.files[0].data)["Seed"] == "7"
    record = (await jobs_in_journal(adapter, ALICE))[0]
    assert record.origin.chat_id == "600000000000000001"
    assert "fake-discord-token" not in caplog.text  # not even in discord.py's debug log

async def test_mass_mentions_in_a_prompt_never_ping(server, start_bot):
    adapter = await start_bot()
    prompt = "@everyone @here <@&555> <@222222222222222222> a fox --seed 7 --steps 1"
    sent = await server.slash("imagine", ALICE, prompt=prompt)
    upload = await final_upload(server, sent)
    await adapter.drain()
    messages = [c for c in server.calls if c.content is not None or c.files]
    assert messages and upload in messages
    assert all(c.json["allowed_mentions"] == {"parse": []} for c in messages)
    assert all(c.pings == frozenset() for c in messages)
    # the second guard: even without allowed_mentions the caption would not ping
    assert "@everyone" not in _text(upload) and "<@&555>" not in _text(upload)


async def test_admin_commands_refuse_everyone_else(server, start_bot):
    adapter = await start_bot()
    for name in ("pause", "status", "resume"):
        sent = await server.slash(name, ALICE)
        assert _text(await private_answer(server, sent)) == render.admin_only()
    refused = await server.slash("limit", ALICE, user=BOB, images=99)
    assert _text(await private_answer(server, refused)) == render.admin_only()
    assert adapter.engine.health().paused is False
    assert await adapter.engine.store.get_limit_override(user_of(BOB)) is None

    paused = await server.slash("pause", ADMIN)
    assert _text(await private_answer(server, paused)) == render.queue_paused()
    assert adapter.engine.health().paused is True
    status = await server.slash("status", ADMIN)
    assert "(paused)" in _text(await private_answer(server, status))
    limit = await server.slash("limit", ADMIN, user=BOB, images=2)
    assert "may now make 2 images" in _text(await private_answer(server, limit))
    assert await adapter.engine.store.get_limit_override(user_of(BOB)) == 2


async def test_admin_may_cancel_anyones_job_and_others_may_not(server, start_bot):
    adapter = await start_bot()
    adapter.engine.pause()  # keep the job waiting
    sent = await server.slash("imagine", ALICE, prompt="a red fox --steps 1")
    await server.wait_for(lambda c: c.token == sent.token and c.name == "edit_original")
    job_id = (await jobs_in_journal(adapter, ALICE))[0].job_id

    stranger = await server.slash("cancel", BOB, job=job_id)
    assert "could not find" in _text(await private_answer(server, stranger))
    admin = await server.slash("cancel", ADMIN, job=job_id)
    assert _text(await private_answer(server, admin)) == render.cancelling(job_id)
    shown = await server.wait_for(lambda c: c.token == sent.token
                                  and _text(c) == render.cancelled(by_owner=False))
    assert _custom_ids(shown) == []  # the Cancel button is gone
    assert adapter.engine.get_job(job_id).status is JobStatus.CANCELLED


async def test_cancel_without_an_id_stops_the_users_latest_job(server, start_bot):
    """As on Telegram and the console (Engine.cancel_named_or_latest)."""
    adapter = await start_bot()
    adapter.engine.pause()
    for prompt in ("first --steps 1", "second --steps 1"):
        sent = await server.slash("imagine", ALICE, prompt=prompt)
        await server.wait_for(lambda c, token=sent.token: c.token == token
                              and c.name == "edit_original")
    ids = {r.request.prompt: r.job_id for r in await jobs_in_journal(adapter, ALICE)}
    first, second = ids["first"], ids["second"]
    answer = await server.slash("cancel", ALICE)
    assert _text(await private_answer(server, answer)) == render.cancelling(second)
    assert adapter.engine.get_job(first).status is JobStatus.QUEUED
    nothing = await server.slash("cancel", BOB)  # Bob has nothing waiting
    assert _text(await private_answer(server, nothing)) == render.queue_list([])


async def test_owner_cancels_with_the_button_while_queued(server, start_bot):
    adapter = await start_bot()
    adapter.engine.pause()
    sent = await server.slash("imagine", ALICE, prompt="a red fox --steps 1")
    first_edit = await server.wait_for(lambda c: c.token == sent.token
                                       and c.name == "edit_original")
    [cancel_id] = _custom_ids(first_edit)
    press = await server.click(server.original(sent)["id"], cancel_id, ALICE)
    assert _text(await private_answer(server, press)).startswith("Cancelling")
    await server.wait_for(lambda c: c.token == sent.token and _text(c) == render.cancelled())
    await adapter.drain()
    assert (await jobs_in_journal(adapter, ALICE))[0].status == "cancelled"


async def posted_after_a_restart(server, start_bot, engine_factory, dconfig, user,
                                 **options):
    """/imagine queued while the engine is paused, the bot stopped before it runs, then
    started again: (the restarted adapter, the channel post of the recovered job)."""
    first = await start_bot()
    first.engine.pause()  # the bot stops before the job runs
    sent = await server.slash("imagine", user, **options)
    await server.wait_for(lambda c: c.token == sent.token and c.name == "edit_original")
    await first.stop()
    await first.engine.shutdown(grace_s=0)

    restarted = await start_bot(engine=await engine_factory(dconfig))
    post = await server.wait_for(lambda c: c.name == "channel_message" and bool(c.files))
    await restarted.drain()
    return restarted, post


async def test_recovered_job_is_posted_to_the_channel_mentioning_its_user(
        server, start_bot, engine_factory, dconfig):
    restarted, post = await posted_after_a_restart(server, start_bot, engine_factory, dconfig,
                                                   ALICE, prompt="a red fox --seed 7 --steps 1")
    assert post.path == f"/channels/{server.channel_id}/messages"
    assert _text(post).startswith(f"<@{ALICE.id}> a red fox")
    assert post.pings == frozenset({f"user:{ALICE.id}"})  # Alice, and nobody else
    assert read_parameters(post.files[0].data)["Seed"] == "7"
    record = (await jobs_in_journal(restarted, ALICE))[0]
    assert record.delivered_to.startswith(f"discord:channel/{server.channel_id}/message/")


async def test_an_expired_interaction_token_falls_back_to_a_channel_post(server, start_bot):
    adapter = await start_bot()
    server.fail_next("edit_original", 404, {"message": "Unknown Webhook", "code": 10015},
                     when=lambda c: bool(c.files))
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 1")
    post = await server.wait_for(lambda c: c.name == "channel_message" and c.status == 200)
    await adapter.drain()
    assert [c.status for c in server.calls_for(sent) if c.files] == [404]
    assert _text(post).startswith(f"<@{ALICE.id}> ") and post.pings == {f"user:{ALICE.id}"}
    assert post.files[0].data.startswith(PNG_SIGNATURE)


async def test_an_image_over_the_guild_limit_is_reencoded_to_fit(server, start_bot):
    adapter = await start_bot()
    server.attachment_size_limit = 30_000  # the dry-run PNG is about 58 kB
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 1")
    upload = await final_upload(server, sent)
    await adapter.drain()
    sent_file = upload.files[0]
    assert len(sent_file.data) <= 30_000
    assert sent_file.filename.rsplit(".", 1)[1] in ("webp", "jpg")
    assert [c.status for c in server.calls_for(sent) if c.files] == [200]


async def test_a_413_from_discord_shrinks_the_image_and_tries_again(server, start_bot):
    adapter = await start_bot()
    server.fail_next("edit_original", 413, {"message": "Request entity too large",
                                            "code": 40005}, when=lambda c: bool(c.files))
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 1")
    upload = await final_upload(server, sent)
    await adapter.drain()
    first, second = [c for c in server.calls_for(sent) if c.files]
    assert first.status == 413 and len(second.files[0].data) < len(first.files[0].data)
    assert upload is second


async def test_failing_progress_edits_never_fail_the_job(server, start_bot):
    adapter = await start_bot(backend=DryRunBackend(step_seconds=0.05))
    server.fail_next("edit_original", 400, times=50, when=lambda c: not c.files)
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 3")
    upload = await final_upload(server, sent)
    await adapter.drain()
    assert any(c.status == 400 for c in server.calls_for(sent))
    assert read_parameters(upload.files[0].data)["Seed"] == "7"
    assert (await jobs_in_journal(adapter, ALICE))[0].delivered_at is not None


async def test_typed_options_fill_in_and_the_prompt_flags_win(server, start_bot):
    adapter = await start_bot()
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7", seed=9, steps=2,
                              aspect="16:9")
    upload = await final_upload(server, sent)
    await adapter.drain()
    request = (await jobs_in_journal(adapter, ALICE))[0].request
    assert (request.seed, request.steps, request.width, request.height) == (7, 2, 1360, 768)
    assert render.conflicts_note(["seed"]) in _text(upload)


@pytest.mark.parametrize("allow_list", ["discord_guilds", "discord_channels"])
async def test_a_place_outside_the_allow_list_is_refused_politely(server, start_bot, dconfig,
                                                                  allow_list):
    setattr(dconfig.access, allow_list, ["123"])
    adapter = await start_bot()
    sent = await server.slash("imagine", ALICE, prompt="a red fox")
    assert _text(await private_answer(server, sent)) == render.chat_not_allowed()
    admin = await server.slash("imagine", ADMIN, prompt="a red fox --steps 1")
    await final_upload(server, admin)  # admins may use the bot anywhere
    await adapter.drain()
    assert await jobs_in_journal(adapter, ALICE) == []


async def test_commands_are_synced_with_the_configured_limits(server, start_bot, dconfig):
    dconfig.limits.steps_max = 30
    dconfig.discord.sync_guild_ids = [server.guild_id]
    await start_bot()
    [sync] = [c for c in server.calls if c.name.startswith("sync")]
    assert sync.name == "sync_guild" and server.guild_id in sync.path
    imagine = next(c for c in sync.json if c["name"] == "imagine")
    steps = next(o for o in imagine["options"] if o["name"] == "steps")
    assert (steps["min_value"], steps["max_value"]) == (1, 30)
    required = {o["name"] for o in imagine["options"] if o.get("required")}
    assert required == {"prompt"}
    aspect = next(o for o in imagine["options"] if o["name"] == "aspect")
    assert {"16:9", "9:16", "1:1"} <= {c["value"] for c in aspect["choices"]}
    names = {c["name"] for c in sync.json}
    assert {"imagine", "queue", "cancel", "limits", "status", "pause", "resume", "limit"} <= names


async def test_queue_and_limits_answer_privately(server, start_bot, dconfig):
    dconfig.rate_limit.images_per_window = 5
    adapter = await start_bot()
    adapter.engine.pause()
    sent = await server.slash("imagine", ALICE, prompt="a red fox --steps 1")
    await server.wait_for(lambda c: c.token == sent.token and c.name == "edit_original")
    queue = await server.slash("queue", ALICE)
    assert "number 1 in line" in _text(await private_answer(server, queue))
    limits = await server.slash("limits", ALICE)
    assert "4 of 5 images left" in _text(await private_answer(server, limits))


# -- platform faults and hostile input ---------------------------------------------------------
async def test_a_late_acknowledgement_queues_nothing_and_the_bot_keeps_serving(server,
                                                                              start_bot):
    adapter = await start_bot()
    server.fail_next("interaction_callback", 404, {"message": "Unknown interaction",
                                                   "code": 10062}, times=2)
    late = await server.slash("imagine", ALICE, prompt="too late --steps 1")
    await server.wait_for_count(lambda c: c.token == late.token, 2)  # defer, then the error
    await adapter.drain()
    assert await jobs_in_journal(adapter, ALICE) == []
    again = await server.slash("imagine", ALICE, prompt="on time --steps 1")
    await final_upload(server, again)
    assert [j.request.prompt for j in await jobs_in_journal(adapter, ALICE)] == ["on time"]


async def test_an_unexpected_error_is_logged_and_the_user_told(server, start_bot, caplog):
    adapter = await start_bot()

    async def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    adapter.engine.submit = broken
    sent = await server.slash("imagine", ALICE, prompt="a red fox --steps 1")
    answer = await private_answer(server, sent)
    assert _text(answer) == render.internal_error()
    assert "disk on fire" not in _text(answer)
    assert any(r.exc_info and "disk on fire" in str(r.exc_info[1]) for r in caplog.records)


HOSTILE = [
    "a fox " * 2000,  # 12,000 characters
    "a fox\x00\x07\x1b[31m in red",
    "a\u200b fox\u200e with\u202e marks\u2066",
    "👩‍🚀 an astronaut fox 🦊🔥",
    "**bold** __fox__ `code` ||spoiler|| [link](https://example.com) <b>html</b>",
    "@everyone @here <@&555> <@222222222222222222> fox",
    "Robert'); DROP TABLE jobs;-- a fox",
    "a fox --steps 1e9",
    "a fox --seed -1",
    "a fox --size 99999x99999",
    "a fox --seed 1 --seed 2",
    "a fox --steps 2 --cfg 3 --guidance 4",
    "--seed 5",
    "a fox --steps 1 --size 256x256",
]


async def test_hostile_prompts_get_a_clear_answer_and_never_a_crash_or_ping(server, start_bot):
    adapter = await start_bot()
    for prompt in HOSTILE:
        sent = await server.slash("imagine", ALICE, prompt=prompt)
        outcome = await server.wait_for(
            lambda c, t=sent.token: c.token == t and (bool(c.files) or bool(_flags(c) & 64)))
        assert _text(outcome) != render.internal_error(), prompt
        if not outcome.files:
            assert _text(outcome).startswith("⚠️"), (prompt, _text(outcome))
    await adapter.drain()
    assert all(c.pings == frozenset() for c in server.calls)
    assert all(c.name != "unknown" for c in server.calls)
    stored = {j.request.prompt for j in await jobs_in_journal(adapter, ALICE)}
    assert "Robert'); DROP TABLE jobs;-- a fox" in stored  # stored as text, table intact
    marks = clean_prompt(HOSTILE[2])  # the shared grammar's cleaning, applied by the adapter
    assert marks in stored and "\u202e" not in marks and "\u200b" not in marks
    markdown = next(c for c in server.calls if c.files and "bold" in _text(c))
    assert r"\*\*bold\*\*" in _text(markdown)  # shown literally, not as Markdown


async def test_a_flood_from_one_user_is_capped_and_every_command_answered_once(
        server, start_bot, dconfig):
    adapter = await start_bot()
    adapter.engine.pause()
    floods = [await server.slash("imagine", ALICE, prompt=f"fox {i} --steps 1")
              for i in range(9)]
    cap = dconfig.engine.max_queue_per_user
    for sent in floods:
        await server.wait_for(lambda c, t=sent.token: c.token == t and (
            c.name == "edit_original" or bool(_flags(c) & 64)))
    refused = [s for s in floods if any(_flags(c) & 64 for c in server.calls_for(s))]
    assert len(refused) == len(floods) - cap
    assert all("waiting" in _text(server.calls_for(s)[-1]) for s in refused)
    acks = [c for c in server.calls if c.name == "interaction_callback"]
    assert sorted(c.token for c in acks) == sorted(s.token for s in floods)
    adapter.engine.resume()
    await server.wait_for_count(lambda c: bool(c.files) and c.status == 200, cap)
    await adapter.drain()
    assert len(await jobs_in_journal(adapter, ALICE)) == cap


_FRAGMENTS = st.sampled_from(["@everyone", "@here", "<@&555>", "<@!123>", "<@123>", "@", "<",
                              ">", "&", "*", "_", "`", "|", "\\", "\u200d", "\u202e", " ", "fox"])


@settings(max_examples=300, deadline=None)
@given(prompt=st.lists(st.one_of(_FRAGMENTS, st.text(max_size=8)), max_size=40).map("".join),
       requester=st.lists(_FRAGMENTS, max_size=6).map("".join))
def test_a_caption_pings_nobody_even_without_allowed_mentions(prompt, requester):
    request = ImageRequest(prompt=prompt or "x", seed=7, steps=4, width=256, height=256,
                           guidance=3.5)
    result = JobResult.single(b"", request, "m", 1.0)
    text = result_caption(result, requester, render.conflicts_note(["seed"]))
    assert len(text) <= 2000  # Discord's message limit
    assert fake_pings({"content": text}) == frozenset()  # Discord's default: parse everything


async def test_a_refused_token_fails_start_clearly_and_never_shows_the_token(
        server, engine_factory, dconfig, caplog):
    caplog.set_level(logging.DEBUG)
    server.fail_next("get_me", 401, {"message": "401: Unauthorized", "code": 0})
    adapter = DiscordAdapter(await engine_factory(dconfig), dconfig, guild_ready_timeout=0.01)
    with pytest.raises(discord.LoginFailure) as refused:
        await adapter.start()
    assert adapter.client is not None and adapter.client.is_closed()
    assert "fake-discord-token" not in str(refused.value)
    assert "fake-discord-token" not in caplog.text


# -- issue 11 rows 14 and 15: nothing lost, nothing posted twice --------------------------------
async def pending_rows(adapter: DiscordAdapter) -> int:
    async with adapter.engine.store.db.execute("SELECT COUNT(*) FROM pending_interactions") as c:
        return (await c.fetchone())[0]


async def a_command_cut_short(server, adapter, user, prompt: str):
    """/imagine acknowledged by the bot, its handler then stuck before the engine journals it:
    (the interaction, the handler's task). Cancelling the task is the "SIGKILL" between
    Discord's acknowledgement and the journal."""
    handlers: list[asyncio.Task] = []

    async def killed_before_journalling(*args, **kwargs):
        handlers.append(asyncio.current_task())
        await asyncio.Event().wait()

    adapter.engine.submit = killed_before_journalling
    lost = await server.slash("imagine", user, prompt=prompt)
    await server.wait_for(lambda c: c.token == lost.token and c.name == "interaction_callback")
    while not handlers:
        await asyncio.sleep(0.01)
    return lost, handlers[0]


async def test_an_interaction_a_crash_left_unanswered_is_told_to_ask_again(
        server, start_bot, engine_factory, dconfig, caplog):
    """Row 15: killed after the deferral and before the job was journalled, the user's
    "thinking…" stayed up for good. Now the next start answers it, once, through its token."""
    first = await start_bot()
    answered = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 1")
    await final_upload(server, answered)
    refused = await server.slash("imagine", ALICE, prompt="a fox --steps 1e9")
    await private_answer(server, refused)
    await first.drain()
    assert await pending_rows(first) == 0  # answered commands leave nothing behind

    lost, handler = await a_command_cut_short(server, first, ALICE, "a lost fox --steps 1")
    expired = PendingInteraction("discord:interaction:1", server.app_id, "expired-token",
                                 server.channel_id, time.time() - 15 * 60)
    await first.engine.pending.add(expired)
    handler.cancel()  # the "SIGKILL": the handler never gets further
    await first.stop()
    await first.engine.shutdown(grace_s=0)

    caplog.set_level(logging.INFO)
    restarted = await start_bot(engine=await engine_factory(dconfig))
    told = [c for c in server.calls_for(lost) if c.name == "edit_original"]
    assert len(told) == 1 and _text(told[0]) == render.restarted_ask_again()
    assert told[0].pings == frozenset()
    assert server.original(lost)["content"] == render.restarted_ask_again()
    assert not any(c.token == "expired-token" for c in server.calls)  # too old: dropped
    assert await pending_rows(restarted) == 0
    bot_side = [r.getMessage() for r in caplog.records if not r.name.startswith("aiohttp")]
    assert any("told interaction" in m for m in bot_side)  # (the fake's access log has URLs)
    assert not any(lost.token in m for m in bot_side)
    assert [j.request.prompt for j in await jobs_in_journal(restarted, ALICE)] == ["a red fox"]


@pytest.mark.parametrize("lost_answer", ["slow", "dropped", "slow, history unreadable"])
async def test_a_channel_post_whose_answer_is_lost_is_not_posted_twice(server, start_bot,
                                                                      lost_answer):
    """Row 14: Discord took the upload but the answer never came back (later than the client
    waits, or the connection dropped); the retry used to post a second image."""
    adapter = await start_bot(clock=lambda: time.time() + 15 * 60,  # the token is gone
                              post_timeout_s=0.3)
    dropped = lost_answer == "dropped"
    server.answer_late("channel_message", 0.0 if dropped else 1.0, drop=dropped)
    if "unreadable" in lost_answer:
        server.fail_next("channel_history", 403, {"message": "Missing Access", "code": 50001},
                         times=5)
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7 --steps 1")
    await server.wait_for(lambda c: c.name == "channel_message")
    await adapter.drain()

    [message] = [m for m in server.channel_messages() if m["attachments"]]
    assert message["attachments"][0]["filename"].endswith("-7.png")
    record = (await jobs_in_journal(adapter, ALICE))[0]
    assert record.delivered_to == f"discord:channel/{server.channel_id}/message/{message['id']}"
    assert [c.name for c in server.calls_for(sent)] == ["interaction_callback"]
    posts = [c for c in server.calls if c.name == "channel_message"]
    looked = [c for c in server.calls if c.name == "channel_history"]
    if "unreadable" in lost_answer:  # posted again: the nonce made Discord return the first
        assert len(posts) == 2 and [c.status for c in looked] == [403]
    else:  # found in the channel: not posted again
        assert len(posts) == 1 and [c.status for c in looked] == [200]
    assert len({c.json["nonce"] for c in posts}) == 1 and all(c.json["enforce_nonce"]
                                                              for c in posts)


# -- issue 12: a grid of N images, U1..UN and V1..VN --------------------------------------------
def _rows(call: Call) -> list[list[str]]:
    payload = call.json or {}
    rows = (payload.get("data") or payload).get("components") or []
    return [[c["custom_id"] for c in row["components"]] for row in rows]


def _labels(call: Call) -> list[str]:
    payload = call.json or {}
    rows = (payload.get("data") or payload).get("components") or []
    return [c["label"] for row in rows for c in row["components"]]


async def post_grid(server: FakeDiscord, adapter: DiscordAdapter, **options):
    """/imagine prompt:"a fox" n:4 seed:5 steps:1 (or ``options``): the upload and the job id."""
    options = {"prompt": "a fox", "n": 4, "seed": 5, "steps": 1, **options}
    sent = await server.slash("imagine", ALICE, **options)
    upload = await final_upload(server, sent)
    job_id = next(j.job_id for j in await jobs_in_journal(adapter, ALICE)
                  if j.request.count == options["n"])
    return sent, upload, job_id


async def test_a_grid_of_four_is_one_message_with_its_files_and_u_v_buttons(server, start_bot):
    adapter = await start_bot()
    sent, upload, job = await post_grid(server, adapter)
    await adapter.drain()

    assert [f.filename for f in upload.files] == [f"{job}-{seed}.png" for seed in (5, 6, 7, 8)]
    assert [read_parameters(f.data)["Seed"] for f in upload.files] == ["5", "6", "7", "8"]
    assert len([c for c in server.calls_for(sent) if c.files]) == 1  # one message
    assert _rows(upload) == [[f"imagine:u:{job}:{i}" for i in range(1, 5)],
                             [f"imagine:v:{job}:{i}:s" for i in range(1, 5)],
                             [f"imagine:reroll:{job}", f"imagine:more:{job}"]]
    assert _labels(upload)[:8] == ["U1", "U2", "U3", "U4", "V1", "V2", "V3", "V4"]
    assert all(len(i) <= 100 for row in _rows(upload) for i in row)  # Discord's limit
    assert "4 images, seeds 5–8" in _text(upload) and "asked by alice" in _text(upload)
    assert len(server.original(sent)["attachments"]) == 4
    record = await adapter.engine.job_record(job)
    assert record.delivered_to.endswith(f"/message/{server.original(sent)['id']}")


async def test_u3_posts_image_three_alone_full_size(server, start_bot):
    adapter = await start_bot()
    sent, grid, job = await post_grid(server, adapter)
    press = await server.click(server.original(sent)["id"], f"imagine:u:{job}:3", ALICE)
    alone = await final_upload(server, press)
    await adapter.drain()

    assert server.calls_for(press)[0].json == {"type": 5}  # deferred: a new message
    [png] = alone.files
    assert png.filename == f"{job}-7.png" and png.data == grid.files[2].data
    assert read_parameters(png.data)["Seed"] == "7"
    assert "seed 7 · 1 step" in _text(alone) and "images" not in _text(alone)
    assert _custom_ids(alone) == [f"imagine:v:{job}:3:s", f"imagine:v:{job}:3:t",
                                  f"imagine:up:{job}:3"]
    assert len(await jobs_in_journal(adapter, ALICE)) == 1  # nothing queued
    assert await pending_rows(adapter) == 0


async def test_v2_queues_a_subtle_variation_of_image_two_and_posts_it(server, start_bot):
    adapter = await start_bot()
    sent, grid, job = await post_grid(server, adapter)
    press = await server.click(server.original(sent)["id"], f"imagine:v:{job}:2:s", ALICE)
    upload = await final_upload(server, press)
    await adapter.drain()

    variation, original = await jobs_in_journal(adapter, ALICE)
    assert original.job_id == job
    request = variation.request
    assert request.init_image.endswith(f"{job}-6.png")
    assert open(request.init_image, "rb").read() == grid.files[1].data  # image 2's file
    assert (request.strength, request.count, request.prompt) == (0.35, 1, "a fox")
    assert request.derived_from == Source("variation", job, 2, "subtle")
    assert read_parameters(upload.files[0].data)["Seed"] == str(request.seed)
    assert upload.files[0].filename == f"{variation.job_id}-{request.seed}.png"
    assert "strength 0.35" in _text(upload)
    assert await pending_rows(adapter) == 0


async def test_one_image_has_vary_subtle_and_strong(server, start_bot):
    adapter = await start_bot()
    sent = await server.slash("imagine", ALICE, prompt="a fox --seed 5 --steps 2")
    upload = await final_upload(server, sent)
    job = (await jobs_in_journal(adapter, ALICE))[0].job_id
    assert _labels(upload)[2:] == ["Vary (subtle)", "Vary (strong)", render.upscale_label()]
    press = await server.click(server.original(sent)["id"], f"imagine:v:{job}:1:t", ALICE)
    await final_upload(server, press)
    await adapter.drain()
    variation = (await jobs_in_journal(adapter, ALICE))[0].request
    assert variation.init_image.endswith(f"{job}-5.png") and variation.strength == 0.7


async def test_upscale_posts_the_image_at_twice_its_size_with_no_buttons(server, start_bot):
    """Issue 12 item 4: the Upscale button; the upscale's own message offers nothing more."""
    adapter = await start_bot()
    sent = await server.slash("imagine", ALICE, prompt="a fox --seed 5 --steps 4 --size 256x256")
    await final_upload(server, sent)
    job = (await jobs_in_journal(adapter, ALICE))[0].job_id
    press = await server.click(server.original(sent)["id"], f"imagine:up:{job}:1", ALICE)
    upload = await final_upload(server, press)
    await adapter.drain()
    up = (await jobs_in_journal(adapter, ALICE))[0]
    assert (up.request.width, up.request.height, up.request.seed) == (512, 512, 5)
    params = read_parameters(upload.files[0].data)
    assert params["Size"] == "512x512" and params["Source"] == f"upscale 2× of {job} #1"
    assert _labels(upload) == []
    stranger = await server.click(server.original(sent)["id"], f"imagine:up:{job}:1", BOB)
    assert _text(await private_answer(server, stranger)) == render.not_your_job()


async def test_a_strangers_u_and_v_presses_are_refused(server, start_bot):
    adapter = await start_bot()
    sent, _, job = await post_grid(server, adapter)
    for button in (f"imagine:u:{job}:3", f"imagine:v:{job}:2:s"):
        press = await server.click(server.original(sent)["id"], button, BOB)
        answer = await private_answer(server, press)
        assert server.calls_for(press) == [answer]  # refused before any deferral
        assert _text(answer) == render.not_your_job()
    await adapter.drain()
    assert await jobs_in_journal(adapter, BOB) == []
    assert len(await jobs_in_journal(adapter, ALICE)) == 1


async def test_u3_and_v2_work_after_a_restart(server, start_bot, engine_factory, dconfig):
    first = await start_bot()
    sent, grid, job = await post_grid(server, first)
    await first.drain()
    await first.stop()
    await first.engine.shutdown(grace_s=0)

    restarted = await start_bot(engine=await engine_factory(dconfig))
    message = server.original(sent)["id"]
    alone = await final_upload(server, await server.click(message, f"imagine:u:{job}:3", ALICE))
    assert alone.files[0].data == grid.files[2].data
    press = await server.click(message, f"imagine:v:{job}:2:s", ALICE)
    upload = await final_upload(server, press)
    await restarted.drain()
    variation = (await jobs_in_journal(restarted, ALICE))[0]
    assert variation.request.init_image.endswith(f"{job}-6.png")
    assert read_parameters(upload.files[0].data)["Seed"] == str(variation.request.seed)
    assert variation.delivered_at is not None


async def test_u_and_v_on_images_no_longer_kept_are_answered_politely(server, start_bot,
                                                                      dconfig):
    dconfig.engine.save_outputs = False  # the files go once posted
    adapter = await start_bot()
    sent, _, job = await post_grid(server, adapter, n=2)
    await adapter.drain()
    for button in (f"imagine:u:{job}:1", f"imagine:v:{job}:2:s"):
        press = await server.click(server.original(sent)["id"], button, ALICE)
        answer = await private_answer(server, press)
        assert server.calls_for(press) == [answer]
        assert _text(answer) == render.image_gone()
    assert len(await jobs_in_journal(adapter, ALICE)) == 1


async def test_a_grid_counts_its_images_against_the_quota(server, start_bot, dconfig):
    dconfig.rate_limit.images_per_window = 5
    adapter = await start_bot()
    await post_grid(server, adapter)
    second = await server.slash("imagine", ALICE, prompt="a fox", n=2, steps=1)
    answer = await private_answer(server, second)
    await adapter.drain()
    assert "You have 1 image left" in _text(answer) and "--n 1" in _text(answer)
    assert [j.request.count for j in await jobs_in_journal(adapter, ALICE)] == [4]


async def test_a_grid_shares_the_upload_limit_between_its_files(server, start_bot):
    adapter = await start_bot()
    server.attachment_size_limit = 100_000  # a dry-run PNG is about 58 kB; four are 230 kB
    sent, upload, _ = await post_grid(server, adapter)
    await adapter.drain()
    assert len(upload.files) == 4 and sum(len(f.data) for f in upload.files) <= 100_000
    assert [c.status for c in server.calls_for(sent) if c.files] == [200]


async def test_a_grid_whose_channel_post_answer_is_lost_is_not_posted_twice(server, start_bot):
    adapter = await start_bot(clock=lambda: time.time() + 15 * 60, post_timeout_s=0.3)
    server.answer_late("channel_message", 1.0)
    await server.slash("imagine", ALICE, prompt="a fox", n=2, seed=5, steps=1)
    await server.wait_for(lambda c: c.name == "channel_message")
    await adapter.drain()
    [message] = [m for m in server.channel_messages() if m["attachments"]]
    assert [a["filename"].rsplit("-", 1)[1] for a in message["attachments"]] == ["5.png",
                                                                                  "6.png"]
    assert len([c for c in server.calls if c.name == "channel_message"]) == 1
    assert [c.status for c in server.calls if c.name == "channel_history"] == [200]  # found
    record = (await jobs_in_journal(adapter, ALICE))[0]
    assert record.delivered_to.endswith(f"/message/{message['id']}")


# -- issue 13: a server cap and /stats -------------------------------------------------------------
async def test_a_server_cap_counts_everyone_in_the_server(server, start_bot, dconfig):
    dconfig.rate_limit.per_chat_images_per_window = 1
    adapter = await start_bot()
    first = await server.slash("imagine", ALICE, prompt="first --seed 1 --steps 1")
    await final_upload(server, first)
    second = await server.slash("imagine", BOB, prompt="second --seed 2 --steps 1")
    answer = await private_answer(server, second)
    assert _text(answer) == ("⚠️ This server has used its 1 image for this hour; you can ask "
                             "again in 1 hour.")
    assert await jobs_in_journal(adapter, BOB) == []
    limits = _text(await private_answer(server, await server.slash("limits", BOB)))
    assert limits.endswith("This server has 0 of 1 images left for everyone in it.")
    direct = await server.slash("imagine", BOB, guild=False, prompt="third --seed 3 --steps 1")
    await final_upload(server, direct)  # a direct message counts against no server
    alone = await server.slash("limits", BOB, guild=False)
    assert "server" not in _text(await private_answer(server, alone))
    await adapter.drain()


async def test_stats_is_for_admins_and_answered_privately(server, start_bot):
    adapter = await start_bot()
    made = await server.slash("imagine", ALICE, prompt="a fox --seed 1 --steps 1")
    await final_upload(server, made)
    await adapter.drain()
    refused = await server.slash("stats", ALICE)
    assert _text(await private_answer(server, refused)) == render.admin_only()
    asked = await server.slash("stats", ADMIN)
    text = _text(await private_answer(server, asked))
    assert text == render.stats(await adapter.engine.stats(), md=True)
    assert "1 image made" in text and f"alice (discord:{ALICE.id})" in text


async def test_styles_are_listed_and_the_style_option_reaches_the_job(server, start_bot, dconfig):
    """Issue 13: /styles and /imagine's style option (autocompleted from the config)."""
    from engine.config import StyleSection

    dconfig.styles = {"watercolor": StyleSection(file="w.safetensors",
                                                 description="soft washes of colour")}
    adapter = await start_bot(dconfig)
    listed = await private_answer(server, await server.slash("styles", ALICE))
    assert _text(listed) == render.styles_list(dconfig.styles)
    assert "--style watercolor — soft washes of colour" in _text(listed)
    sent = await server.slash("imagine", ALICE, prompt="a fox --steps 1", style="watercolor")
    await final_upload(server, sent)
    await adapter.drain()
    assert (await jobs_in_journal(adapter, ALICE))[0].request.style == "watercolor"
    refused = await server.slash("imagine", ALICE, prompt="a fox --steps 1", style="oil")
    assert "watercolor" in _text(await private_answer(server, refused))
    await adapter.drain()
    assert len(await jobs_in_journal(adapter, ALICE)) == 1


async def test_the_style_option_autocompletes_the_configured_styles(server, start_bot, dconfig):
    """Issue 13: what Discord shows while a user types --style's option: the configured styles
    that start with what was typed, through discord.py's autocomplete round trip."""
    from engine.config import StyleSection

    dconfig.styles = {name: StyleSection(file=f"{name}.safetensors")
                      for name in ("watercolor", "woodcut", "ink")}
    await start_bot(dconfig)
    typed = await server.autocomplete("imagine", ALICE, focused="style", prompt="a fox",
                                      style="W")
    await server.wait_for(lambda c: c.token == typed.token and c.name == "interaction_callback")
    assert server.choices(typed) == [{"name": "watercolor", "value": "watercolor"},
                                     {"name": "woodcut", "value": "woodcut"}]
    empty = await server.autocomplete("imagine", ALICE, focused="style", prompt="a fox",
                                      style="")
    await server.wait_for(lambda c: c.token == empty.token and c.name == "interaction_callback")
    assert [c["value"] for c in server.choices(empty)] == ["ink", "watercolor", "woodcut"]
