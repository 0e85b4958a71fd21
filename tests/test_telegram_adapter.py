"""The Telegram adapter end to end: the real python-telegram-bot client against a fake Bot API.

Each test starts the real ``TelegramAdapter`` (PTB Application, its rate limiter, long polling)
pointed at ``FakeTelegramServer`` on 127.0.0.1, feeds it updates and asserts the calls PTB made.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from telegram.error import InvalidToken

from bot import render, telegram_jobs
from bot.telegram_adapter import TelegramAdapter
from bot.telegram_limiter import ACK, PriorityRateLimiter
from engine import result_files
from engine.backends.dry_run import DryRunBackend
from engine.config import Config
from engine.engine import Engine
from engine.errors import InvalidCommand
from engine.grammar import parse_command
from engine.job import Job, JobStatus
from engine.png import read_parameters
from engine.request import Origin, Source, User
from engine.store import JobRecord
from tests.conftest import RecordingBackend
from tests.fakes.telegram_server import BOT_USERNAME, Call, FakeTelegramServer

TOKEN = "123456789:AAHfakeTokenForTests_abcdefghijklmnopq"
SETUP_CALLS = ("getUpdates", "getMe", "setMyCommands", "deleteWebhook")
ALICE, BOB, ADMIN = 42, 43, 7
GROUP = -1001234


def user(uid: int) -> User:
    return User("telegram", str(uid), "Ada")  # the fake names every user Ada


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELEGRAM_TOKEN", raising=False)


@pytest.fixture(autouse=True)
def _keep_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests read every job the adapter submitted from ``engine._jobs``; keep delivered
    ones there too (the engine's own retention is tested in test_engine.py)."""
    monkeypatch.setattr(Engine, "_forget", lambda self, job: None)


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegramServer]:
    async with FakeTelegramServer() as server:
        yield server


@pytest.fixture
def tg_config(config: Config, tg: FakeTelegramServer) -> Config:
    config.telegram.token = TOKEN
    config.telegram.base_url = tg.base_url
    config.telegram.base_file_url = tg.base_file_url
    config.telegram.progress_interval_s = 0.0
    config.delivery.first_delay_s = 0.05
    config.delivery.attempts = 3
    config.access.telegram_admins = [str(ADMIN)]
    return config


Starter = Callable[..., Awaitable[tuple[Engine, TelegramAdapter]]]


@pytest.fixture
async def start_bot(tg_config: Config, engine_factory: Any) -> AsyncIterator[Starter]:
    """Open an engine (dry-run backend) and start the real adapter against the fake server."""
    adapters: list[TelegramAdapter] = []

    async def start(step_s: float = 0.0, engine: Engine | None = None,
                    backend: DryRunBackend | None = None,
                    limiter: PriorityRateLimiter | None = None) -> tuple[Engine, TelegramAdapter]:
        engine = engine or await engine_factory(tg_config, backend or DryRunBackend(step_s))
        adapter = TelegramAdapter(engine, tg_config, poll_timeout_s=1, rate_limiter=limiter)
        await adapter.start()
        adapters.append(adapter)
        return engine, adapter

    yield start
    for adapter in adapters:
        await adapter.stop()


def reply_to(call: Call) -> int | None:
    reply = call.json("reply_parameters")
    return reply["message_id"] if reply else None


def buttons(call: Call) -> list[str]:
    markup = call.json("reply_markup") or {"inline_keyboard": []}
    return [b["callback_data"] for row in markup["inline_keyboard"] for b in row]


async def finished_job(engine: Engine, uid: int) -> Job:
    jobs = [j for j in engine._jobs.values() if j.user.user_id == str(uid)]
    assert jobs, "no job was queued"
    await jobs[-1].wait()
    return jobs[-1]


# -- the main story --------------------------------------------------------------------------
async def test_imagine_posts_status_progress_and_png_with_the_seed(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    backend = RecordingBackend(step_seconds=0.05)
    backend.gate = threading.Event()  # holds the started job until the test releases it
    engine, _ = await start_bot(backend=backend)
    assert tg.calls_to("setMyCommands"), "the command menu is published at start-up"
    engine.pause()  # hold the job so the status message is seen while it is queued
    sent = tg.message("/imagine a red fox --seed 7 --steps 4", chat_id=ALICE, user_id=ALICE)
    status = await tg.wait_for("sendMessage")
    engine.resume()
    try:
        await tg.wait_for("editMessageText")  # "Drawing…"
    finally:
        backend.gate.set()
    await tg.wait_for("deleteMessage")

    # The number of progress edits depends on timing (the editor always shows the latest
    # state and coalesces the rest), so runs of edits are collapsed before comparing. No chat
    # action before the status message (it follows at once); one before the upload.
    assert collapse(tg.methods(ignore=SETUP_CALLS)) == [
        "sendMessage", "editMessageText", "sendChatAction", "sendPhoto", "deleteMessage"]
    job = await finished_job(engine, ALICE)
    action = tg.calls_to("sendChatAction")[0]
    assert action.params["action"] == "upload_photo"
    assert status.params["text"] == render.queued(1)
    assert reply_to(status) == sent["message_id"]
    assert buttons(status) == [f"cancel:{job.id}"]
    edits = tg.calls_to("editMessageText")
    assert all(c.params["message_id"] == str(tg.sent("sendMessage")[0]["message_id"])
               for c in edits)
    assert all(buttons(c) == [f"cancel:{job.id}"] for c in edits)
    shown = [c.params["text"] for c in edits]
    steps = [int(t.split("step ")[1].split("/")[0]) for t in shown if "step " in t]
    assert all(t == render.started(job.request) or "/4" in t for t in shown)
    assert steps == sorted(set(steps)), "progress only moves forward, never repeats"

    photo = tg.calls_to("sendPhoto")[0]
    assert reply_to(photo) == sent["message_id"]
    assert "parse_mode" not in photo.params  # plain text: prompts cannot inject markup
    assert photo.params["caption"].startswith("a red fox\nseed 7 · 4 steps · 1024×1024")
    assert buttons(photo) == [f"reroll:{job.id}", f"more:{job.id}", f"v:{job.id}:1:s",
                              f"v:{job.id}:1:t", f"up:{job.id}:1"]
    png = photo.upload("photo").data
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    params = read_parameters(png)
    assert params["Seed"] == "7" and params["Steps"] == "4" and params["prompt"] == "a red fox"
    deleted = tg.calls_to("deleteMessage")[0]
    assert deleted.params["message_id"] == str(tg.sent("sendMessage")[0]["message_id"])
    record = await delivered(engine, job.id)
    assert record.delivered_to == f"telegram:{ALICE}/{tg.sent('sendPhoto')[0]['message_id']}"
    assert all(c.token == TOKEN for c in tg.calls)


async def delivered(engine: Engine, job_id: str, timeout: float = 5.0) -> JobRecord:
    """The job's journal record once it says delivered (the journal write follows the upload)."""
    deadline = time.monotonic() + timeout
    while True:
        record = await engine.job_record(job_id)
        if record is not None and record.delivered_at is not None:
            return record
        assert time.monotonic() < deadline, f"job {job_id} was never marked delivered: {record}"
        await asyncio.sleep(0.01)


def collapse(methods: list[str]) -> list[str]:
    """Runs of the same method as one entry."""
    return [m for i, m in enumerate(methods) if i == 0 or methods[i - 1] != m]


async def test_progress_edits_are_throttled_to_the_interval(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    tg_config.telegram.progress_interval_s = 0.3
    engine, _ = await start_bot(step_s=0.05)
    tg.message("/imagine a slow fox --steps 20", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendPhoto", timeout=10)
    edits = tg.calls_to("editMessageText")
    assert 1 <= len(edits) < 20, "20 progress events must be coalesced, not sent one by one"
    gaps = [b.at - a.at for a, b in zip(edits, edits[1:], strict=False)]
    assert all(gap >= 0.3 * 0.8 for gap in gaps), gaps
    job = await finished_job(engine, ALICE)
    assert job.status is JobStatus.FINISHED


async def test_group_command_with_bot_name_and_png_document(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    tg_config.telegram.send_png_document = True
    engine, _ = await start_bot()
    tg.message("/imagine@OtherBot not for us", chat_id=GROUP, user_id=ALICE)
    sent = tg.message(f"/imagine@{BOT_USERNAME} a lighthouse --seed 3 --steps 2",
                      chat_id=GROUP, user_id=ALICE)
    document = await tg.wait_for("sendDocument")
    photo = tg.calls_to("sendPhoto")[0]
    assert photo.params["chat_id"] == str(GROUP) and reply_to(photo) == sent["message_id"]
    png = document.upload("document").data
    assert read_parameters(png)["Seed"] == "3"
    assert document.upload("document").filename.endswith("-3.png")
    assert len(engine._jobs) == 1, "the command addressed to another bot is ignored"


async def test_plain_text_is_a_prompt_in_private_chats_only(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    tg.message("just some group chatter", chat_id=GROUP, user_id=BOB)
    tg.message("a cat in a hat --steps 2", chat_id=ALICE, user_id=ALICE)
    photo = await tg.wait_for("sendPhoto")
    assert read_parameters(photo.upload("photo").data)["prompt"] == "a cat in a hat"
    assert [j.user.user_id for j in engine._jobs.values()] == [str(ALICE)]


# -- refusals --------------------------------------------------------------------------------
async def test_bad_input_gets_one_clear_error_and_queues_nothing(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    engine, _ = await start_bot()
    text = "/imagine a fox --steps 1e9"
    with pytest.raises(InvalidCommand) as expected:
        parse_command(text, tg_config.limits)
    sent = tg.message(text, chat_id=ALICE, user_id=ALICE)
    reply = await tg.wait_for("sendMessage")
    tg.message("/help", chat_id=ALICE, user_id=ALICE)  # a barrier: its reply comes after
    await tg.wait_for("sendMessage", 2)
    assert reply.params["text"] == render.error(expected.value)
    assert reply_to(reply) == sent["message_id"]
    assert tg.methods(ignore=SETUP_CALLS) == ["sendMessage", "sendMessage"]
    assert engine._jobs == {} and await engine.store.jobs_for_user(user(ALICE)) == []


@pytest.mark.parametrize("text", [
    "/imagine", "/imagine --seed 7", "/imagine a fox --seed -1",
    "/imagine a fox --size 99999x99999",
    "/imagine a fox --steps 4 --steps 5", "/imagine a fox --sneed 4", "/imagine " + "fox " * 400,
])
async def test_hostile_or_malformed_commands_get_the_grammar_error(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config, text: str) -> None:
    engine, _ = await start_bot()
    with pytest.raises(InvalidCommand) as expected:
        parse_command(text, tg_config.limits)
    tg.message(text, chat_id=ALICE, user_id=ALICE)
    reply = await tg.wait_for("sendMessage")
    assert reply.params["text"] == render.error(expected.value)
    assert len(reply.params["text"]) < 400 and engine._jobs == {}


async def test_a_flood_from_one_user_is_capped_and_every_command_answered(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    engine, _ = await start_bot()
    engine.pause()
    for n in range(8):
        tg.message(f"/imagine fox number {n}", chat_id=ALICE, user_id=ALICE)
    cap = tg_config.engine.max_queue_per_user
    await tg.wait_for("sendMessage", 8)  # 5 status messages and 3 refusals
    refusals = [c for c in tg.calls_to("sendMessage") if c.params["text"].startswith("⚠️")]
    assert len(refusals) == 8 - cap and len(engine.jobs_of(user(ALICE))) == cap
    assert all("most is 5" in c.params["text"] for c in refusals)


async def test_rate_limited_user_is_told_and_not_queued(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    tg_config.rate_limit.images_per_window = 1
    engine, _ = await start_bot()
    tg.message("/imagine first --steps 1", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendPhoto")
    tg.message("/imagine second --steps 1", chat_id=ALICE, user_id=ALICE)
    refusal = await tg.wait_for("sendMessage", 2)
    assert refusal.params["text"].startswith("⚠️ ")
    assert "1" in refusal.params["text"]  # the limit is named
    assert [r.request.prompt for r in await engine.store.jobs_for_user(user(ALICE))] == ["first"]
    assert len(tg.calls_to("sendPhoto")) == 1


async def test_admin_commands_are_refused_for_everyone_else(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    for command in ("/status", "/pause", f"/limit {BOB} 2"):
        tg.message(command, chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendMessage", 3)
    assert [c.params["text"] for c in tg.calls_to("sendMessage")] == [render.admin_only()] * 3
    assert not engine.health().paused
    assert (await engine.quota(user(BOB))).limit == 100

    tg.message("/pause", chat_id=ADMIN, user_id=ADMIN)
    assert (await tg.wait_for("sendMessage", 4)).params["text"] == render.queue_paused()
    assert engine.health().paused
    tg.message(f"/limit {BOB} 2", chat_id=ADMIN, user_id=ADMIN)
    assert (await tg.wait_for("sendMessage", 5)).params["text"] == render.limit_set(str(BOB), 2)
    assert (await engine.quota(user(BOB))).limit == 2
    tg.message("/status", chat_id=ADMIN, user_id=ADMIN)
    status = (await tg.wait_for("sendMessage", 6)).params["text"]
    assert status == render.status(engine.health()) and "(paused)" in status
    tg.message("/limit bob lots", chat_id=ADMIN, user_id=ADMIN)
    assert (await tg.wait_for("sendMessage", 7)).params["text"] == render.limit_usage()


async def test_admin_cancels_anyones_job_and_owner_cancels_own(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    engine.pause()
    tg.message("/imagine one", chat_id=ALICE, user_id=ALICE)
    tg.message("/imagine two", chat_id=ALICE, user_id=ALICE)
    await tg.wait_until(lambda: len(engine.jobs_of(user(ALICE))) == 2)
    first, second = engine.jobs_of(user(ALICE))
    tg.message(f"/cancel {first.id}", chat_id=BOB, user_id=BOB)  # a stranger: not found
    refused = await tg.wait_for("sendMessage", where=lambda c: c.params["chat_id"] == str(BOB))
    assert refused.params["text"].startswith("⚠️ I could not find that job")
    assert first.status is JobStatus.QUEUED
    tg.message(f"/cancel {first.id}", chat_id=ADMIN, user_id=ADMIN)
    await tg.wait_for("sendMessage", where=lambda c: c.params["text"]
                      == render.cancelling(first.id))
    tg.message("/cancel", chat_id=ALICE, user_id=ALICE)  # the latest of hers
    await tg.wait_for("sendMessage", where=lambda c: c.params["text"]
                      == render.cancelling(second.id))
    assert first.status is second.status is JobStatus.CANCELLED
    await tg.wait_for("editMessageText", 2, where=lambda c: c.params["text"].startswith("🛑"))


async def test_chat_not_in_the_allowed_list_is_refused(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    tg_config.access.telegram_chats = [str(GROUP)]
    engine, _ = await start_bot()
    tg.message("/imagine a fox", chat_id=ALICE, user_id=ALICE)
    refusal = await tg.wait_for("sendMessage")
    assert refusal.params["text"] == render.chat_not_allowed()
    assert engine._jobs == {}
    tg.message("/imagine a fox --steps 1", chat_id=GROUP, user_id=ALICE)
    photo = await tg.wait_for("sendPhoto")
    assert photo.params["chat_id"] == str(GROUP)


# -- buttons ---------------------------------------------------------------------------------
async def test_reroll_queues_a_new_job_with_a_new_seed(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    tg.message("/imagine a red fox --seed 7 --steps 2", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendPhoto")
    first = await finished_job(engine, ALICE)
    photo_message = tg.sent("sendPhoto")[0]
    query_id = tg.press(photo_message, f"reroll:{first.id}", user_id=ALICE)
    answer = await tg.wait_for("answerCallbackQuery")
    second_photo = await tg.wait_for("sendPhoto", 2)

    assert answer.params["callback_query_id"] == query_id
    second = [j for j in engine._jobs.values() if j is not first][0]
    assert second.request.seed != 7
    assert second.request.with_changes(seed=7, seed_was_random=False) == first.request
    assert answer.params["text"] == render.rerolling(second.request.seed)
    assert reply_to(second_photo) == photo_message["message_id"]
    assert read_parameters(second_photo.upload("photo").data)["Seed"] == str(second.request.seed)


async def test_an_admin_may_cancel_anothers_job_but_not_make_images_from_it(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    """The rule both platforms share (Engine.may_press), as on Discord."""
    engine, _ = await start_bot()
    engine.pause()
    tg.message("/imagine a red fox --steps 1", chat_id=GROUP, user_id=ALICE)
    await tg.wait_for("sendMessage")
    job = engine.jobs_of(user(ALICE))[0]
    status_message = tg.sent("sendMessage")[0]
    tg.press(status_message, f"reroll:{job.id}", user_id=ADMIN)
    refused = await tg.wait_for("answerCallbackQuery")
    assert refused.params["text"] == render.not_your_job() and len(engine._jobs) == 1
    tg.press(status_message, f"cancel:{job.id}", user_id=ADMIN)
    answer = await tg.wait_for("answerCallbackQuery", 2)
    assert answer.params["text"] == render.cancelling(job.id)
    await job.wait()
    assert job.status is JobStatus.CANCELLED
    final = await tg.wait_for("editMessageText")
    assert final.params["text"] == render.cancelled(False)


async def test_strangers_press_is_refused_and_answered(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    engine.pause()
    tg.message("/imagine a red fox --steps 1", chat_id=GROUP, user_id=ALICE)
    status = await tg.wait_for("sendMessage")
    job = engine.jobs_of(user(ALICE))[0]
    status_message = tg.sent("sendMessage")[0]
    tg.press(status_message, f"cancel:{job.id}", user_id=BOB)
    tg.press(status_message, "garbage-from-an-old-bot", user_id=BOB)
    tg.press(status_message, f"reroll:{job.id}", user_id=BOB)
    await tg.wait_for("answerCallbackQuery", 3)
    answers = sorted((c.params.get("text", ""), c.params.get("show_alert", "false"))
                     for c in tg.calls_to("answerCallbackQuery"))
    assert answers == sorted([("", "false"), (render.not_your_job(), "true"),
                              (render.not_your_job(), "true")])
    assert job.status is JobStatus.QUEUED and len(engine._jobs) == 1

    tg.press(status_message, f"cancel:{job.id}", user_id=ALICE, first_name="Ada Renamed")
    await tg.wait_for("answerCallbackQuery", 4)
    await job.wait()
    assert job.status is JobStatus.CANCELLED
    final = await tg.wait_for("editMessageText")
    assert final.params["text"] == render.cancelled(True)
    assert buttons(final) == [] and final.params["message_id"] == str(status_message["message_id"])
    assert status.params["chat_id"] == str(GROUP)


# -- platform faults -------------------------------------------------------------------------
async def test_429_on_send_photo_waits_retry_after_then_succeeds(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    tg.fail_next("sendPhoto", 429, retry_after=1)
    tg.message("/imagine a red fox --seed 7 --steps 1", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendPhoto", 2, timeout=8)
    refused, accepted = tg.calls_to("sendPhoto")
    assert (refused.status, accepted.status) == (429, 200)
    assert accepted.at - refused.at >= 1.0, "retry_after was not honoured"
    assert read_parameters(accepted.upload("photo").data)["Seed"] == "7"
    job = await finished_job(engine, ALICE)
    await delivered(engine, job.id)


async def test_5xx_on_upload_is_retried_and_failed_edits_never_fail_the_job(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    backend = RecordingBackend()
    backend.gate = threading.Event()  # the job starts, then waits until released
    engine, _ = await start_bot(backend=backend)
    tg.fail_next("editMessageText", 502, times=50)
    tg.fail_next("sendPhoto", 502)
    engine.pause()  # queued first, so that starting needs an edit
    tg.message("/imagine a red fox --steps 3", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendMessage")
    engine.resume()
    try:
        await tg.wait_for("editMessageText")  # "Drawing…", refused with a 502
    finally:
        backend.gate.set()
    await tg.wait_for("sendPhoto", 2)
    assert [c.status for c in tg.calls_to("sendPhoto")] == [502, 200]
    assert tg.calls_to("editMessageText") and all(
        c.status == 502 for c in tg.calls_to("editMessageText"))
    job = await finished_job(engine, ALICE)
    record = await delivered(engine, job.id)
    assert record.delivery_attempts == 2


async def test_undeliverable_result_is_journaled_and_the_user_told(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    tg.fail_next("sendPhoto", 403, description="Forbidden: bot was blocked by the user")
    tg.message("/imagine a red fox --steps 1", chat_id=ALICE, user_id=ALICE)
    final = await tg.wait_for("editMessageText", where=lambda c: c.params["text"]
                              == render.undelivered())
    assert len(tg.calls_to("sendPhoto")) == 1, "403 is permanent: no pointless retries"
    job = await finished_job(engine, ALICE)
    record = await engine.job_record(job.id)
    assert record is not None and record.delivered_at is None
    assert "blocked" in (record.last_delivery_error or "")
    assert buttons(final) == []


async def test_token_never_appears_in_logs_even_when_requests_fail(
        tg: FakeTelegramServer, start_bot: Starter, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    tg.fail_next("getUpdates", 502)
    engine, _ = await start_bot()
    tg.fail_next("sendPhoto", 500, times=3)
    tg.message("/imagine a red fox --steps 1", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendPhoto", 3)

    async def broken(*_: object) -> None:
        raise RuntimeError(f"boom while calling {tg.base_url}{TOKEN}/getMe")

    monkeypatch.setattr(engine, "quota", broken)
    tg.message("/limits", chat_id=ALICE, user_id=ALICE)
    told = await tg.wait_for("sendMessage", where=lambda c: c.params["text"]
                             == render.internal_error())
    await tg.wait_until(lambda: any(r.levelno == logging.ERROR for r in caplog.records))
    assert "HTTP Request" in caplog.text, "httpx request lines were captured (and masked)"
    assert any("delivering job" in r.getMessage() for r in caplog.records)
    texts = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert not [t for t in texts if TOKEN in t]
    assert TOKEN not in caplog.text
    assert TOKEN not in told.params["text"]


async def test_unexpected_error_is_logged_then_the_user_told(
        tg: FakeTelegramServer, start_bot: Starter, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = await start_bot()

    def broken() -> None:
        raise RuntimeError("health probe exploded")

    monkeypatch.setattr(engine, "health", broken)
    sent = tg.message("/status", chat_id=ADMIN, user_id=ADMIN)
    reply = await tg.wait_for("sendMessage")
    assert reply.params["text"] == render.internal_error() and reply_to(reply) == sent["message_id"]
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged and "exploded" in str(logged[0].exc_info[1])  # type: ignore[index]


# -- restart and odd sizes -------------------------------------------------------------------
async def test_a_wrong_token_fails_start_and_leaves_nothing_behind(
        tg: FakeTelegramServer, tg_config: Config, engine_factory: Any) -> None:
    engine = await engine_factory(tg_config, DryRunBackend())
    tg.fail_next("getMe", 401, description="Unauthorized")
    adapter = TelegramAdapter(engine, tg_config, poll_timeout_s=1)
    with pytest.raises(InvalidToken):
        await adapter.start()
    assert adapter.application is None
    assert not logging.getLogger("httpx").filters
    assert tg.methods(ignore=()) == ["getMe"]


async def test_recovered_result_is_delivered_as_a_reply_after_restart(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config, engine_factory: Any
        ) -> None:
    before = await engine_factory(tg_config, DryRunBackend())
    origin = Origin("telegram", chat_id=str(ALICE), message_id="77")
    request = parse_command("a red fox --seed 7 --steps 2", tg_config.limits).to_request(
        tg_config.limits)
    job = await before.submit(User("telegram", str(ALICE), "Ada"), request, origin)
    await job.wait()  # finished while no adapter was there to deliver it
    await before.shutdown(grace_s=1)

    after = await engine_factory(tg_config, DryRunBackend())
    assert [j.id for j in after.recovered_jobs("telegram")] == [job.id]
    await start_bot(engine=after)
    photo = await tg.wait_for("sendPhoto")
    assert photo.params["chat_id"] == str(ALICE) and reply_to(photo) == 77
    assert read_parameters(photo.upload("photo").data)["Seed"] == "7"
    assert tg.methods(ignore=SETUP_CALLS) == ["sendChatAction", "sendPhoto"]
    record = await delivered(after, job.id)
    assert record.delivered_to == f"telegram:{ALICE}/{tg.sent('sendPhoto')[0]['message_id']}"


async def test_job_queued_before_a_restart_runs_and_replies_to_the_original_message(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config, engine_factory: Any
        ) -> None:
    before = await engine_factory(tg_config, DryRunBackend())
    before.pause()
    request = parse_command("a red fox --seed 9 --steps 2", tg_config.limits).to_request(
        tg_config.limits)
    job = await before.submit(User("telegram", str(ALICE), "Ada"), request,
                              Origin("telegram", chat_id=str(ALICE), message_id="78"))
    await before.shutdown(grace_s=0)

    after = await engine_factory(tg_config, DryRunBackend())
    await start_bot(engine=after)
    photo = await tg.wait_for("sendPhoto")
    status = tg.calls_to("sendMessage")[0]
    assert reply_to(status) == 78 and reply_to(photo) == 78
    assert read_parameters(photo.upload("photo").data)["Seed"] == "9"
    await delivered(after, job.id)


async def test_photo_too_large_goes_as_a_document(
        tg: FakeTelegramServer, start_bot: Starter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telegram_jobs, "PHOTO_MAX_BYTES", 1000)
    await start_bot()
    tg.message("/imagine a red fox --seed 5 --steps 1", chat_id=ALICE, user_id=ALICE)
    document = await tg.wait_for("sendDocument")
    assert tg.calls_to("sendPhoto") == []
    assert read_parameters(document.upload("document").data)["Seed"] == "5"
    assert document.params["caption"].startswith("a red fox\nseed 5")


async def test_hostile_prompt_is_shown_as_plain_text(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    await start_bot()
    prompt = "*bold* <b>html</b> [link](http://x) @everyone"
    tg.message(f"/imagine {prompt} --steps 1", chat_id=ALICE, user_id=ALICE)
    photo = await tg.wait_for("sendPhoto")
    assert "parse_mode" not in photo.params
    assert photo.params["caption"].startswith("*bold* <b>html</b> [link](http://x) @\u200deveryone")
    assert len(photo.params["caption"]) <= 1024


async def test_queue_limits_and_help(tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    engine.pause()
    tg.message("/imagine a quiet lake", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendMessage")
    for command in ("/queue", "/limits", "/help"):
        tg.message(command, chat_id=ALICE, user_id=ALICE)
        await tg.wait_for("sendMessage", len(tg.calls_to("sendMessage")) + 1)
    queue, limits, help_text = [c.params["text"] for c in tg.calls_to("sendMessage")[1:]]
    job = engine.jobs_of(user(ALICE))[0]
    assert queue == render.queue_list([job]) and job.id in queue
    assert limits == render.quota(await engine.quota(user(ALICE)), engine.clock())
    assert help_text == render.usage(engine.config.limits)


# -- acknowledgements first ------------------------------------------------------------------
BACKGROUND = ("sendChatAction", "sendPhoto", "deleteMessage", "editMessageText")


async def test_a_new_command_is_answered_before_other_jobs_queued_uploads(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    # A slow limiter (5 requests a second, its first 5 at once) so that six finished jobs' chat
    # actions, photos and deletes (about 20 requests) are still waiting in it when a seventh
    # user's command arrives. At 10 a second, a loaded CI machine's latency between the backlog
    # starting and the late command let all but 9 through first.
    engine, _ = await start_bot(limiter=PriorityRateLimiter(overall_per_s=5))
    for uid in range(100, 106):
        tg.message(f"/imagine fox {uid} --seed 1 --steps 1", chat_id=uid, user_id=uid)
    await tg.wait_for("sendMessage", 6)
    for uid in range(100, 106):
        await finished_job(engine, uid)  # every job over: its uploads are queued in the limiter
    await tg.wait_for("sendChatAction")  # ...and the backlog has started to drain
    late = tg.message("/imagine a late fox --seed 2 --steps 1", chat_id=200, user_id=200)
    ack = await tg.wait_for("sendMessage", where=lambda c: reply_to(c) == late["message_id"])

    served = tg.served[tg.update_of[(200, late["message_id"])]][0]
    before = [c for c in tg.calls[:tg.calls.index(ack)]
              if c.method in BACKGROUND and c.at >= served]
    assert buttons(ack)[0].startswith("cancel:"), "the acknowledgement is the status message"
    # Behind at most the two background requests already waiting in the bucket (and one sent).
    assert len(before) <= 3, [c.method for c in before]
    await tg.wait_for("deleteMessage", 7, timeout=10)
    after = tg.calls[tg.calls.index(ack) + 1:]
    queued_earlier = [c for c in after if c.method in BACKGROUND
                      and c.json("chat_id") in range(100, 106)]
    assert len(queued_earlier) >= 10, "the earlier jobs' requests waited behind the reply"


async def test_limiter_sends_acks_first_and_keeps_the_overall_rate() -> None:
    limiter = PriorityRateLimiter(overall_per_s=5, background_slots=2)
    sent: list[str] = []

    async def call(name: str) -> bool:
        sent.append(name)
        return True

    async def request(name: str, lane: object) -> None:
        await limiter.process_request(call, (name,), {}, "sendMessage", {"chat_id": 1}, lane)

    background = [asyncio.create_task(request(f"bg{i}", None)) for i in range(10)]
    await asyncio.sleep(0)  # the background requests are queued first
    acks = [asyncio.create_task(request(f"ack{i}", ACK)) for i in range(3)]
    await asyncio.gather(*background, *acks)
    # The bucket's first 5 tokens go at once to the first background requests; then the two
    # waiting in the bucket, then the acks, then the rest.
    first_ack = sent.index("ack0")
    assert sent[first_ack:first_ack + 3] == ["ack0", "ack1", "ack2"]
    assert first_ack <= 5 + 2, sent
    assert sorted(sent) == sorted([f"bg{i}" for i in range(10)] + ["ack0", "ack1", "ack2"])


async def test_group_requests_keep_the_group_budget() -> None:
    limiter = PriorityRateLimiter(overall_per_s=100, group_per_minute=3)
    sent: list[int] = []

    async def call(chat: int) -> bool:
        sent.append(chat)
        return True

    async def request(chat: int) -> None:
        await limiter.process_request(call, (chat,), {}, "sendMessage", {"chat_id": chat}, None)

    tasks = [asyncio.create_task(request(GROUP)) for _ in range(5)]
    tasks += [asyncio.create_task(request(ALICE)) for _ in range(5)]
    await asyncio.sleep(0.3)
    assert sent.count(GROUP) == 3, "a group gets its 3 a minute, the rest wait"
    assert sent.count(ALICE) == 5, "a private chat is not held up by a busy group"
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_limit_of_zero_stops_the_user_instead_of_lifting_the_limit(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    """Issue 11 row 4: `/limit <id> 0` removed the user's limit while saying "0 images"."""
    engine, _ = await start_bot()
    tg.message(f"/limit {BOB} 0", chat_id=ADMIN, user_id=ADMIN)
    assert (await tg.wait_for("sendMessage")).params["text"] == render.limit_set(str(BOB), 0)
    assert (await engine.quota(user(BOB))).limit == 0
    tg.message("/imagine a fox --steps 1", chat_id=BOB, user_id=BOB)
    refusal = (await tg.wait_for("sendMessage", 2)).params["text"]
    assert "limit to 0" in refusal
    assert await engine.store.jobs_for_user(user(BOB)) == []


async def test_status_in_a_group_names_no_user_and_no_error(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    """Issue 11 row 12: /status in a group posted the last exception and users' keys."""
    engine, _ = await start_bot()
    engine._last_error = "abc123: RuntimeError('/home/admin/secret/path')"
    tg.message("/status", chat_id=GROUP, user_id=ADMIN, chat_type="supergroup")
    text = (await tg.wait_for("sendMessage")).params["text"]
    assert "secret" not in text and "telegram:" not in text
    assert "ask /status in a private chat" in text
    tg.message("/status", chat_id=ADMIN, user_id=ADMIN)
    private = (await tg.wait_for("sendMessage", 2)).params["text"]
    assert "/home/admin/secret/path" in private


async def test_a_shutdown_posts_the_image_it_waited_for_before_stopping(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    """Issue 11 rows 2 and 16: a graceful stop waited for the running image, then stopped the
    adapter, which cancelled that very upload (posted only after the restart, or twice)."""
    from bot.app import shut_down

    tg_config.delivery.first_delay_s = 0.3
    engine, adapter = await start_bot(step_s=0.05)
    tg.fail_next("sendPhoto", 502)  # the upload is still being retried when the stop begins
    tg.message("/imagine a red fox --steps 6", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("editMessageText")  # drawing
    await shut_down(engine, [adapter], grace_s=10)
    assert [c.status for c in tg.calls_to("sendPhoto")] == [502, 200]
    job = await finished_job(engine, ALICE)
    assert (await engine.job_record(job.id)).delivered_at is not None
    await adapter.stop()
    assert len(tg.calls_to("sendPhoto")) == 2  # nothing posted twice


async def test_a_slow_upload_is_never_posted_twice(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    """Issue 11 row 14: Telegram took the photo but answered after the client's timeout; the
    bot retried, five photos in the chat, and more after each restart."""
    tg_config.telegram.read_timeout_s = 0.5
    tg_config.delivery.first_delay_s = 0.05
    engine, _ = await start_bot()
    tg.slow_next("sendPhoto", 1.5)
    tg.message("/imagine a red fox --steps 1", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendPhoto")
    job = await finished_job(engine, ALICE)
    record = await delivered(engine, job.id)
    assert record.delivered_to.startswith("unknown: TimedOut")
    await asyncio.sleep(1.5)  # time for any retry that should not happen
    assert len(tg.calls_to("sendPhoto")) == 1
    assert [r.job_id for r in await engine.store.undelivered_jobs()] == []  # not after a restart


async def test_after_a_restart_the_old_status_message_is_edited_not_posted_again(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config, engine_factory: Any
        ) -> None:
    """Issue 11 row 19: each restart posted a new status message for every recovered job and
    left the old ones saying "Queued" with a live Cancel button."""
    before = await engine_factory(tg_config, DryRunBackend())
    before.pause()
    _, adapter = await start_bot(engine=before)
    tg.message("/imagine a red fox --steps 2", chat_id=ALICE, user_id=ALICE)
    status = await tg.wait_for("sendMessage")
    status_id = tg.sent("sendMessage")[0]["message_id"]
    await adapter.stop()
    await before.shutdown(grace_s=0)

    after = await engine_factory(tg_config, DryRunBackend())
    await start_bot(engine=after)
    await tg.wait_for("sendPhoto")
    assert len(tg.calls_to("sendMessage")) == 1  # no second status message
    edits = [c for c in tg.calls_to("editMessageText") + tg.calls_to("deleteMessage")
             if int(c.params["message_id"]) == status_id]
    assert edits, "the old status message was brought up to date or removed"
    assert reply_to(status) is not None


async def test_a_group_flooding_help_does_not_hold_up_other_chats(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    """Issue 11 row 13: each reply waited for the group's 20-a-minute bucket inside its
    handler; 330 /help in one group made another user's /imagine wait 163 s."""
    import time

    _, adapter = await start_bot()
    for _ in range(300):
        tg.message("/help", chat_id=GROUP, user_id=BOB, chat_type="supergroup")
    await asyncio.sleep(0.5)  # the flood is being handled
    asked = time.monotonic()
    tg.message("/imagine a red fox --steps 1", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendMessage", where=lambda c: c.params["chat_id"] == str(ALICE),
                      timeout=10)
    assert time.monotonic() - asked < 3.0
    await tg.wait_for("sendPhoto", timeout=10)
    to_group = [c for c in tg.calls_to("sendMessage") if c.params["chat_id"] == str(GROUP)]
    assert len(to_group) <= 25  # the group's bucket, not 300 answers queued for minutes
    assert adapter.outbox.dropped >= 250


async def test_a_chat_not_allowed_is_told_once_a_minute(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    tg_config.access.telegram_chats = [str(ALICE)]
    await start_bot()
    for _ in range(5):
        tg.message("/imagine a fox", chat_id=GROUP, user_id=BOB, chat_type="supergroup")
    await tg.wait_for("sendMessage")
    await asyncio.sleep(0.5)
    assert [c.params["text"] for c in tg.calls_to("sendMessage")] == [render.chat_not_allowed()]


def test_limit_parsing_knows_none_and_unlimited() -> None:
    from bot.telegram_adapter import parse_limit
    from engine.store import UNLIMITED

    assert parse_limit(["43", "0"])[1] == 0
    assert parse_limit(["43", "unlimited"])[1] == UNLIMITED
    assert parse_limit(["43", "default"])[1] is None
    assert parse_limit(["43", "-1"]) is None  # the number itself is not accepted


async def test_an_unreachable_telegram_is_retried_instead_of_stopping_the_bot(
        tg: FakeTelegramServer, tg_config: Config, engine_factory: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 15 row 4: with no network `run` said `httpx.ConnectError` (no word of Telegram)
    and exited."""
    from bot import telegram_adapter

    monkeypatch.setattr(telegram_adapter, "RECONNECT_FIRST_S", 0.2)
    engine = await engine_factory(tg_config, DryRunBackend())
    tg.fail_next("getMe", 502, times=2)  # Telegram's side is down for a while
    adapter = TelegramAdapter(engine, tg_config, poll_timeout_s=1)
    with caplog.at_level("WARNING"):
        await adapter.start()  # returns: the bot serves its other adapters meanwhile
        assert "cannot reach Telegram's Bot API" in caplog.text and "retrying in" in caplog.text
    try:
        tg.message("/imagine a red fox --steps 1", chat_id=ALICE, user_id=ALICE)
        await tg.wait_for("sendPhoto", timeout=10)  # connected on a later try
        assert len(tg.calls_to("getMe")) >= 3
    finally:
        await adapter.stop()


async def test_a_chinese_imagine_with_full_width_flags_works_end_to_end(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    await start_bot()
    tg.message("/imagine 雪中的红狐狸 ——seed ７ ——steps １", chat_id=ALICE, user_id=ALICE)
    photo = await tg.wait_for("sendPhoto")
    params = read_parameters(photo.upload("photo").data)
    assert params["Seed"] == "7" and params["Steps"] == "1"
    assert params["prompt"] == "雪中的红狐狸"


async def test_the_outbox_drops_help_before_a_refusal() -> None:
    """Review: a /help flood pushed out an /imagine refusal waiting in the same chat."""
    from bot.telegram_outbox import ChatOutbox

    sent: list[str] = []
    gate = asyncio.Event()

    def reply(text: str):  # type: ignore[no-untyped-def]
        async def send() -> None:
            await gate.wait()
            sent.append(text)
        return send

    outbox = ChatOutbox(max_waiting=3)
    outbox.post(1, reply("first"), droppable=True)  # taken by the sender at once
    await asyncio.sleep(0)
    outbox.post(1, reply("refusal"))
    for i in range(5):
        outbox.post(1, reply(f"help {i}"), droppable=True)
    gate.set()
    await outbox.close()
    assert "refusal" in sent and sent[0] == "first" and len(sent) == 4


async def test_a_reconnect_survives_odd_answers_until_telegram_is_back(
        tg: FakeTelegramServer, tg_config: Config, engine_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: an answer that was not a NetworkError (a proxy's page, a 429) ended the
    background reconnect for good, silently."""
    from bot import telegram_adapter

    monkeypatch.setattr(telegram_adapter, "RECONNECT_FIRST_S", 0.1)
    engine = await engine_factory(tg_config, DryRunBackend())
    tg.fail_next("getMe", 502)  # unreachable: start returns, reconnecting in the background
    tg.fail_next("getMe", 429, retry_after=1, times=1)  # then Telegram throttles once
    adapter = TelegramAdapter(engine, tg_config, poll_timeout_s=1)
    await adapter.start()
    try:
        tg.message("/imagine a fox --steps 1", chat_id=ALICE, user_id=ALICE)
        await tg.wait_for("sendPhoto", timeout=15)
    finally:
        await adapter.stop()


async def test_an_update_is_confirmed_only_once_its_job_is_journalled(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    """Issue 11 row 15: updates were confirmed to Telegram (the next getUpdates offset) before
    their jobs were journalled; a SIGKILL 0.2 s after a burst of 60 lost 53 commands."""
    import sqlite3

    confirmed_without_a_job: list[int] = []
    confirmed: list[int] = []

    def check(update_ids: list[int]) -> None:
        db = sqlite3.connect(tg_config.engine.database)
        keys = {row[0] for row in db.execute("SELECT request_key FROM jobs")}
        db.close()
        confirmed.extend(update_ids)
        confirmed_without_a_job.extend(
            u for u in update_ids if f"telegram:update:{u}" not in keys)

    tg.on_confirm = check
    engine, adapter = await start_bot()
    engine.pause()
    messages = [tg.message(f"/imagine fox {i} --steps 1", chat_id=ALICE + i, user_id=ALICE + i)
                for i in range(30)]
    ids = [tg.update_of[(ALICE + i, m["message_id"])] for i, m in enumerate(messages)]
    while not set(ids) <= set(confirmed):
        await asyncio.sleep(0.02)
    assert confirmed_without_a_job == []


async def test_a_refusal_confirmed_but_not_posted_before_a_crash_is_posted_after_it(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config,
        engine_factory: Any) -> None:
    """Found by the load test (a SIGKILL 0.2 s after a burst): a refused command's update was
    confirmed once its handler returned, with the refusal still waiting in the chat's outbox;
    the kill lost it, and Telegram did not send the command again. The refusal is journalled
    before the handler returns, and the next start posts what the last one could not."""
    confirmed: list[int] = []
    tg.on_confirm = confirmed.extend
    engine, adapter = await start_bot()
    adapter.outbox.post = lambda *args, **kwargs: None  # the process dies before it posts
    message = tg.message("/imagine a fox --steps 900", chat_id=ALICE, user_id=ALICE)
    update_id = tg.update_of[(ALICE, message["message_id"])]
    while update_id not in confirmed:
        await asyncio.sleep(0.02)
    [left] = await engine.pending_replies.take("telegram", since=0)
    assert left.reply_to == str(message["message_id"]) and "steps" in left.text
    await adapter.stop()
    await engine.shutdown()
    assert not [c for c in tg.calls_to("sendMessage") if reply_to(c) == message["message_id"]]

    again, _ = await start_bot(engine=await engine_factory(tg_config, DryRunBackend()))
    answer = await tg.wait_for("sendMessage")
    assert reply_to(answer) == message["message_id"] and left.text in answer.params["text"]
    while await again.pending_replies.take("telegram", since=0):
        await asyncio.sleep(0.02)
    assert len([c for c in tg.calls_to("sendMessage")
                if reply_to(c) == message["message_id"]]) == 1


async def test_updates_sent_again_after_a_crash_queue_no_second_job(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    """After a crash before the offset reached Telegram, it sends the batch again: the update
    id kept with each job stops a second one (commands and re-roll presses alike)."""
    from telegram import Update

    tg_config.engine.max_queue_per_user = 50  # the queue cap must not be what refuses them
    engine, adapter = await start_bot()
    engine.pause()
    ids = []
    for i in range(5):
        message = tg.message(f"/imagine fox {i} --steps 1", chat_id=ALICE, user_id=ALICE)
        ids.append(tg.update_of[(ALICE, message["message_id"])])
    while len(await engine.store.jobs_for_user(user(ALICE))) < 5:
        await asyncio.sleep(0.02)
    again = [Update.de_json(tg.sent_updates[i], adapter.application.bot) for i in ids]
    await adapter.polling._handle(again)  # what the restarted bot's first poll gets
    assert len(await engine.store.jobs_for_user(user(ALICE))) == 5
    assert engine.queued_count() == 5


async def test_in_a_busy_group_a_result_goes_before_progress_edits() -> None:
    """Issue 11 row 18: finished images waited minutes behind chat actions and position edits
    in a group's 20-a-minute budget."""
    from bot.telegram_limiter import PriorityBucket

    bucket = PriorityBucket(max_rate=1, period_s=0.2, background_slots=1)
    await bucket.acquire(ack=False)  # the bucket is full for 0.2 s
    order: list[str] = []

    async def request(name: str, progress: bool) -> None:
        await bucket.acquire(ack=False, progress=progress)
        order.append(name)

    edits = [asyncio.create_task(request(f"edit {i}", True)) for i in range(3)]
    await asyncio.sleep(0.01)
    photo = asyncio.create_task(request("photo", False))
    await asyncio.wait_for(asyncio.gather(*edits, photo), 5)
    assert order[0] in ("edit 0", "photo") and order.index("photo") <= 1


async def test_a_cancelled_request_does_not_lift_a_429_pause_for_everyone() -> None:
    """Issue 11 row 18: the pause was a flag the waiting request cleared in ``finally``."""
    import time

    from telegram.error import RetryAfter

    from bot.telegram_limiter import PriorityRateLimiter

    limiter = PriorityRateLimiter(max_retries=1)
    calls: list[float] = []

    async def throttled() -> dict:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RetryAfter(1)
        return {}

    async def plain() -> dict:
        calls.append(time.monotonic())
        return {}

    started = time.monotonic()
    first = asyncio.create_task(limiter.process_request(throttled, (), {}, "sendMessage",
                                                        {"chat_id": 42}, None))
    await asyncio.sleep(0.1)
    first.cancel()  # e.g. an edit that a newer one replaced
    await asyncio.gather(first, return_exceptions=True)
    await limiter.process_request(plain, (), {}, "sendMessage", {"chat_id": 43}, None)
    assert calls[-1] - started >= 1.0  # still paused after the cancellation


# -- grids and the image actions (issue 12) --------------------------------------------------
def grid_buttons(tg: FakeTelegramServer) -> list[dict[str, Any]]:
    """The messages that carry a grid's buttons (they follow its album)."""
    return [c.result for c in tg.calls_to("sendMessage", ok_only=True)
            if any(b.startswith("u:") for b in buttons(c))]


async def post_grid(tg: FakeTelegramServer, engine: Engine, text: str = "a fox --n 4 --seed 5"
                    ) -> tuple[Job, dict[str, Any], dict[str, Any]]:
    """/imagine a grid as Alice; the job, her command and the message with the grid's buttons."""
    command = tg.message(f"/imagine {text} --steps 1", chat_id=ALICE, user_id=ALICE)
    await tg.wait_until(lambda: bool(grid_buttons(tg)), what="the grid's buttons")
    return await finished_job(engine, ALICE), command, grid_buttons(tg)[0]


def seeds_of(call: Call) -> list[str]:
    return [read_parameters(upload.data)["Seed"] for _, upload in call.media()]


async def test_a_grid_of_four_is_one_album_then_one_message_with_its_buttons(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    job, command, keys = await post_grid(tg, engine)
    album = tg.calls_to("sendMediaGroup")[0]
    assert len(tg.calls_to("sendMediaGroup")) == 1 and tg.calls_to("sendPhoto") == []
    assert [item["type"] for item, _ in album.media()] == ["photo"] * 4
    assert seeds_of(album) == ["5", "6", "7", "8"]
    captions = [item.get("caption") for item, _ in album.media()]
    assert captions[0].startswith("a fox\n4 images, seeds 5–8 · 1 step") and captions[1:] == [
        None] * 3
    assert reply_to(album) == command["message_id"]
    after = tg.calls_to("sendMessage")[-1]
    assert reply_to(after) == command["message_id"] and after.result == keys
    assert buttons(after) == ([f"u:{job.id}:{n}" for n in range(1, 5)]
                              + [f"v:{job.id}:{n}:s" for n in range(1, 5)] + [f"reroll:{job.id}"])
    assert all(len(data.encode()) <= 64 for data in buttons(after))
    first = tg.sent("sendMediaGroup")[0][0]["message_id"]
    assert (await delivered(engine, job.id)).delivered_to == f"telegram:{ALICE}/{first}"


async def test_u3_posts_image_3_alone_as_a_png_document_with_its_seed(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    job, _, keys = await post_grid(tg, engine)
    tg.press(keys, f"u:{job.id}:3", user_id=ALICE)
    document = await tg.wait_for("sendDocument")
    answer = await tg.wait_for("answerCallbackQuery")
    assert answer.params["text"] == render.posting_alone(3)
    png = document.upload("document").data
    assert read_parameters(png)["Seed"] == "7" and document.upload(
        "document").filename == f"{job.id}-7.png"
    assert document.params["caption"].startswith("a fox\nseed 7 · 1 step")
    assert reply_to(document) == keys["message_id"]
    assert buttons(document) == [f"v:{job.id}:3:s", f"v:{job.id}:3:t", f"up:{job.id}:3"]
    assert len(engine._jobs) == 1, "posting an image alone queues nothing"


async def test_v2_queues_a_subtle_variation_of_image_2_and_posts_it(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    engine, _ = await start_bot()
    job, _, keys = await post_grid(tg, engine)
    tg.press(keys, f"v:{job.id}:2:s", user_id=ALICE)
    photo = await tg.wait_for("sendPhoto")
    variation = await finished_job(engine, ALICE)
    record = await engine.job_record(job.id)
    image_2 = result_files.paths(record.result_path, record.request)[1]
    assert variation.request.init_image == str(image_2) and image_2.exists()
    assert variation.request.strength == 0.35 and variation.request.count == 1
    assert variation.request.derived_from == Source("variation", job.id, 2, "subtle")
    answer = tg.calls_to("answerCallbackQuery")[0]
    assert answer.params["text"] == render.varying("subtle", 2, variation.request.seed)
    assert reply_to(photo) == keys["message_id"]
    assert read_parameters(photo.upload("photo").data)["Seed"] == str(variation.request.seed)
    await delivered(engine, variation.id)


async def test_another_users_u3_and_v2_are_refused_and_queue_nothing(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    job, _, keys = await post_grid(tg, engine)
    tg.press(keys, f"u:{job.id}:3", user_id=BOB)
    tg.press(keys, f"v:{job.id}:2:s", user_id=BOB)
    await tg.wait_for("answerCallbackQuery", 2)
    answers = [(c.params.get("text"), c.params.get("show_alert"))
               for c in tg.calls_to("answerCallbackQuery")]
    assert answers == [(render.not_your_job(), "true")] * 2
    await asyncio.sleep(0.2)
    assert len(engine._jobs) == 1 and tg.calls_to("sendDocument") == []
    assert await engine.store.jobs_for_user(user(BOB)) == []


async def test_v2_pressed_after_a_restart_still_makes_the_variation(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config, engine_factory: Any
        ) -> None:
    before = await engine_factory(tg_config, DryRunBackend())
    _, adapter = await start_bot(engine=before)
    job, _, keys = await post_grid(tg, before)
    await delivered(before, job.id)
    await adapter.stop()
    await before.shutdown(grace_s=1)

    after = await engine_factory(tg_config, DryRunBackend())
    await start_bot(engine=after)
    tg.press(keys, f"v:{job.id}:2:s", user_id=ALICE)
    photo = await tg.wait_for("sendPhoto")
    variation = await finished_job(after, ALICE)
    assert variation.request.init_image.endswith(f"{job.id}-6.png")
    assert reply_to(photo) == keys["message_id"]


async def test_buttons_of_a_grid_whose_images_are_gone_answer_politely(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    job, _, keys = await post_grid(tg, engine)
    record = await engine.job_record(job.id)
    for path in result_files.paths(record.result_path, record.request):
        path.unlink()
    tg.press(keys, f"u:{job.id}:3", user_id=ALICE)
    tg.press(keys, f"v:{job.id}:2:s", user_id=ALICE)
    await tg.wait_for("answerCallbackQuery", 2)
    texts = sorted(c.params.get("text") for c in tg.calls_to("answerCallbackQuery"))
    assert texts == sorted([render.image_gone(),
                            "⚠️ That image is no longer kept by the bot, so it cannot be varied."])
    assert len(engine._jobs) == 1 and tg.calls_to("sendDocument") == []


async def test_a_single_image_has_vary_and_same_seed_more_steps(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    tg.message("/imagine a red fox --seed 7 --steps 2", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendPhoto")
    first = await finished_job(engine, ALICE)
    photo_message = tg.sent("sendPhoto")[0]
    tg.press(photo_message, f"more:{first.id}", user_id=ALICE)
    await tg.wait_for("sendPhoto", 2)
    more = await finished_job(engine, ALICE)
    assert (more.request.seed, more.request.steps) == (7, 12)
    tg.press(photo_message, f"v:{first.id}:1:t", user_id=ALICE)
    await tg.wait_for("sendPhoto", 3)
    strong = await finished_job(engine, ALICE)
    assert strong.request.strength == 0.7 and strong.request.init_image.endswith(
        f"{first.id}-7.png")
    texts = [c.params.get("text") for c in tg.calls_to("answerCallbackQuery")]
    assert texts == [render.more_steps_queued(12),
                     render.varying("strong", 1, strong.request.seed)]


async def test_upscale_posts_the_image_at_twice_its_size(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    """Issue 12 item 4: the Upscale button under one image; the upscale has no buttons."""
    engine, _ = await start_bot()
    tg.message("/imagine a red fox --seed 7 --steps 4 --size 256x256", chat_id=ALICE,
               user_id=ALICE)
    await tg.wait_for("sendPhoto")
    first = await finished_job(engine, ALICE)
    photo_message = tg.sent("sendPhoto")[0]
    assert "up:" + first.id + ":1" in str(tg.calls_to("sendPhoto")[0].params["reply_markup"])
    tg.press(photo_message, f"up:{first.id}:1", user_id=BOB)  # not his
    tg.press(photo_message, f"up:{first.id}:1", user_id=ALICE)
    await tg.wait_for("sendPhoto", 2)
    second = tg.calls_to("sendPhoto")[1]
    up = await finished_job(engine, ALICE)
    assert (up.request.width, up.request.height, up.request.seed) == (512, 512, 7)
    params = read_parameters(second.upload("photo").data)
    assert params["Size"] == "512x512" and params["Source"] == f"upscale 2× of {first.id} #1"
    assert "reply_markup" not in second.params
    texts = [c.params.get("text") for c in tg.calls_to("answerCallbackQuery")]
    assert render.not_your_job() in texts and render.upscaling(1, 512, 512) in texts
    assert len(await engine.store.jobs_for_user(user(BOB))) == 0


async def test_a_grid_counts_its_images_against_the_quota(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    tg_config.rate_limit.images_per_window = 5
    engine, _ = await start_bot()
    await post_grid(tg, engine, "a fox --n 4")
    tg.message("/imagine a fox --n 2 --steps 1", chat_id=ALICE, user_id=ALICE)
    refusal = await tg.wait_for("sendMessage", where=lambda c: "left" in c.params["text"])
    assert refusal.params["text"].startswith("⚠️ You have 1 image left for ")
    assert "try --n 1" in refusal.params["text"]
    assert len(await engine.store.jobs_for_user(user(ALICE))) == 1


async def test_a_slow_album_is_never_posted_twice(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    """The same at-most-once rule as a photo: Telegram took the album, the answer came late."""
    tg_config.telegram.read_timeout_s = 0.5
    engine, _ = await start_bot()
    tg.slow_next("sendMediaGroup", 1.5)
    job, _, _ = await post_grid(tg, engine)
    record = await delivered(engine, job.id)
    assert record.delivered_to.startswith("unknown: TimedOut")
    await asyncio.sleep(1.5)  # time for any retry that should not happen
    assert len(tg.calls_to("sendMediaGroup")) == 1


async def test_a_grid_with_png_documents_adds_an_album_of_the_pngs(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    tg_config.telegram.send_png_document = True
    engine, _ = await start_bot()
    await post_grid(tg, engine)
    documents = await tg.wait_for("sendMediaGroup", 2)
    assert [item["type"] for item, _ in documents.media()] == ["document"] * 4
    assert seeds_of(documents) == ["5", "6", "7", "8"]


async def test_a_grid_too_large_for_photos_goes_as_an_album_of_documents(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telegram_jobs, "PHOTO_MAX_BYTES", 1000)
    tg_config.telegram.send_png_document = True  # nothing more to send: they are PNGs already
    engine, _ = await start_bot()
    job, _, _ = await post_grid(tg, engine)
    await delivered(engine, job.id)
    (album,) = tg.calls_to("sendMediaGroup")
    assert [item["type"] for item, _ in album.media()] == ["document"] * 4
    assert album.media()[0][0]["caption"].startswith("a fox\n4 images")
    assert seeds_of(album) == ["5", "6", "7", "8"]


async def test_buttons_that_fail_to_post_are_retried_without_posting_the_album_again(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    engine.pause()
    tg.message("/imagine a fox --n 2 --steps 1", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendMessage")  # the status message
    tg.fail_next("sendMessage", 502)  # the buttons' first try
    engine.resume()
    await tg.wait_until(lambda: bool(grid_buttons(tg)), what="the grid's buttons")
    assert [c.status for c in tg.calls_to("sendMessage")] == [200, 502, 200]
    assert len(tg.calls_to("sendMediaGroup")) == 1


def test_button_data_is_parsed_strictly() -> None:
    from bot.telegram_buttons import Press, parse_press

    assert parse_press("u:ab12:3") == Press("u", "ab12", 3)
    assert parse_press("v:ab12:2:t") == Press("v", "ab12", 2, "strong")
    assert parse_press("more:ab12") == Press("more", "ab12")
    for data in ("u:ab12", "u:ab12:x", "u::3", "v:ab12:2:q", "v:ab12:2", "u:ab12:١", "reroll:",
                 "reroll:a:b", "garbage-from-an-old-bot", ""):
        assert parse_press(data) is None, data


# -- issue 13: per-chat caps and /stats ------------------------------------------------------------
async def test_a_group_cap_refuses_the_next_user_in_that_group_only(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    tg_config.rate_limit.per_chat_images_per_window = 1
    engine, _ = await start_bot()
    tg.message("/imagine first --steps 1", chat_id=GROUP, user_id=ALICE, chat_type="supergroup")
    await tg.wait_for("sendPhoto")
    tg.message("/imagine second --steps 1", chat_id=GROUP, user_id=BOB, chat_type="supergroup")
    refusal = await tg.wait_for("sendMessage", where=lambda c: c.params["text"].startswith("⚠️"))
    assert refusal.params["text"] == ("⚠️ This group has used its 1 image for this hour; you "
                                      "can ask again in 1 hour.")
    assert await engine.store.jobs_for_user(user(BOB)) == []
    tg.message("/limits", chat_id=GROUP, user_id=BOB, chat_type="supergroup")
    limits = await tg.wait_for("sendMessage", where=lambda c: "everyone" in c.params["text"])
    assert limits.params["text"] == ("You have 100 of 100 images left. This group has 0 of 1 "
                                     "images left for everyone in it.")
    tg.message("/imagine third --steps 1", chat_id=BOB, user_id=BOB)  # a private chat: no cap
    await tg.wait_for("sendPhoto", 2)
    tg.message("/limits", chat_id=BOB, user_id=BOB)  # no group there: the user's own alone
    own = await tg.wait_for("sendMessage", where=lambda c: c.params["chat_id"] == str(BOB)
                            and c.params["text"].startswith("You have"))
    assert "group" not in own.params["text"]


async def test_stats_names_users_only_in_a_group_and_is_in_the_admins_menu(
        tg: FakeTelegramServer, start_bot: Starter) -> None:
    engine, _ = await start_bot()
    menus = [m for m in tg.calls_to("setMyCommands") if "language_code" not in m.params]
    assert len(menus) == 2 and "scope" not in menus[0].params
    assert menus[1].json("scope") == {"type": "chat", "chat_id": ADMIN}
    assert "stats" in [c["command"] for c in menus[1].json("commands")]
    assert "stats" not in [c["command"] for c in menus[0].json("commands")]
    tg.message("/imagine a fox --steps 1", chat_id=GROUP, user_id=ALICE, chat_type="supergroup",
               first_name="Alice")
    await tg.wait_for("sendPhoto")
    tg.message("/stats", chat_id=GROUP, user_id=ALICE, chat_type="supergroup")
    assert (await tg.wait_for("sendMessage", 2)).params["text"] == render.admin_only()
    tg.message("/stats", chat_id=GROUP, user_id=ADMIN, chat_type="supergroup")
    in_group = (await tg.wait_for("sendMessage", 3)).params["text"]
    assert "The last day: 1 image made" in in_group and "Top users: Alice 1" in in_group
    assert str(ALICE) not in in_group and "telegram:" not in in_group
    tg.message("/stats", chat_id=ADMIN, user_id=ADMIN)
    private = (await tg.wait_for("sendMessage", 4)).params["text"]
    assert private == render.stats(await engine.stats()) and f"telegram:{ALICE}" in private


async def test_styles_lists_the_configured_styles(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config) -> None:
    from engine.config import StyleSection

    tg_config.styles = {"ink": StyleSection(file="ink.safetensors", description="brush ink")}
    await start_bot()
    tg.message("/styles", chat_id=ALICE, user_id=ALICE)
    answer = await tg.wait_for("sendMessage")
    assert answer.params["text"] == render.styles_list(tg_config.styles)
    assert "styles" in [c["command"] for c in tg.calls_to("setMyCommands")[0].json("commands")]


async def test_a_grids_buttons_not_posted_before_a_stop_are_posted_at_the_next_start(
        tg: FakeTelegramServer, start_bot: Starter, tg_config: Config,
        engine_factory: Any) -> None:
    """An album carries no buttons, so they follow it in a message of their own. That message
    is owed in the journal until it is out: a stop while it still fails posts it later."""
    tg_config.delivery.attempts, tg_config.delivery.first_delay_s = 5, 2.0
    engine, adapter = await start_bot()
    tg.message("/imagine a fox --n 2 --seed 5 --steps 1", chat_id=ALICE, user_id=ALICE)
    await tg.wait_for("sendMediaGroup")
    tg.fail_next("sendMessage", 502, times=1)  # the buttons' first try fails...
    job = await finished_job(engine, ALICE)

    async def owed_now() -> list[Any]:
        return [r for r in await engine.pending_replies.take("telegram", since=0)
                if r.reply_key == f"telegram:buttons:{job.id}"]

    while not [c for c in tg.calls_to("sendMessage") if c.status == 502] \
            or not await owed_now():
        await asyncio.sleep(0.02)  # the album is out, the buttons' first try has failed
    [owed] = await owed_now()
    await adapter.stop()  # ...and the bot stops while it waits to try again
    await engine.shutdown()
    grid_buttons = [c for c in tg.calls_to("sendMessage", ok_only=True)
                    if f"u:{job.id}:1" in str(c.params.get("reply_markup"))]
    assert grid_buttons == []

    again, _ = await start_bot(engine=await engine_factory(tg_config, DryRunBackend()))
    while not [c for c in tg.calls_to("sendMessage", ok_only=True)
               if f"u:{job.id}:1" in str(c.params.get("reply_markup"))]:
        await asyncio.sleep(0.02)
    posted = [c for c in tg.calls_to("sendMessage", ok_only=True)
              if f"u:{job.id}:1" in str(c.params.get("reply_markup"))]
    assert len(posted) == 1 and posted[0].params["text"] == owed.text
    assert tg.calls_to("sendMediaGroup") and len(tg.calls_to("sendMediaGroup")) == 1
    while await again.pending_replies.take("telegram", since=0):
        await asyncio.sleep(0.02)
