"""Hostile and odd input through the shared parsing and rendering: a clear answer, never a crash,
never a ping, never a stored-data problem."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot import render
from engine.config import LimitsSection
from engine.errors import InvalidCommand
from engine.grammar import parse_command
from engine.job import JobResult, JobStatus
from tests.conftest import ORIGIN, discord_user

LIMITS = LimitsSection()
CORPUS = [
    "x" * 10_001,
    "fox " * 3000,
    "a fox\x00\x07\x1b[31m in snow\r\n--seed 5",
    "zero\u200bwidth\u200d joiners\ufeff and \u202eright-to-left\u202c marks",
    "\u200fright-to-left mark\u200e and arabic letter mark\u061c",
    "🦊🔥 emoji only 👩\u200d🚀",
    "**bold** _it_ `code` [link](http://x) <b>html</b> <script>alert(1)</script>",
    "@everyone look @here <@&123456> <@!42> <#99>",
    "Robert'); DROP TABLE jobs;--",
    "fox --steps 1e9",
    "fox --seed -1",
    "fox --size 99999x99999",
    "fox --seed 1 --seed 2",
    "fox --steps " + "9" * 5000,
    "fox --guidance nan",
    "fox --guidance inf",
    "fox --ar 1:0",
    "fox --ar 100000:1",
    "/imagine",
    "/imagine@SomeBot    ",
    "   ",
    "—seed 5",
    '"unbalanced quote --seed 5',
    "fox --",
    "fox --=5",
    "fox ——seed 5",
    "\u0000" * 50,
]


def assert_safe_caption(text: str) -> None:
    assert not re.search(r"(?<!\\)@(everyone|here)\b", text), text
    assert all(ch not in text for ch in "\x00\x07\x1b\u202e\u200f\u200e\u061c")


@pytest.mark.parametrize("text", CORPUS)
def test_corpus_gets_a_clear_answer_or_a_clean_request(text):
    try:
        request = parse_command(text, LIMITS).to_request(LIMITS, random.Random(1))
    except InvalidCommand as exc:
        message = str(exc)
        assert 10 < len(message) < 400 and message.endswith((".", "?", ")"))
        assert "\n" not in message
        return
    assert 0 < len(request.prompt) <= LIMITS.max_prompt_chars
    assert LIMITS.steps_min <= request.steps <= LIMITS.steps_max
    assert request.width * request.height <= LIMITS.max_pixels
    result = JobResult.single(b"", request, "m", 1.0)
    for md in (False, True):
        caption = render.caption(result, "@everyone", md=md)
        assert_safe_caption(caption)
        assert len(caption) <= 1024  # Telegram's caption limit is the tighter one


@given(st.text(max_size=3000))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_text_renders_without_pings_and_within_limits(text):
    try:
        request = parse_command(text, LIMITS).to_request(LIMITS, random.Random(0))
    except InvalidCommand:
        return
    result = JobResult.single(b"", request, "m", 2.0)
    for md in (False, True):
        caption = render.caption(result, text[:100], md=md)
        assert_safe_caption(caption)
        assert len(caption) <= 1024


async def test_sql_looking_and_unicode_prompts_round_trip_through_the_journal(engine_factory):
    engine = await engine_factory()
    user = discord_user("1'; DROP TABLE jobs; --")
    for text in CORPUS[4:8]:
        request = parse_command(text, LIMITS).to_request(LIMITS, random.Random(2))
        job = await engine.submit(user, request, ORIGIN)
        assert await job.wait() is JobStatus.FINISHED
        record = await engine.job_record(job.id)
        assert record.request == request and record.user == user


async def test_a_flood_from_one_user_is_capped_and_others_still_get_served(engine_factory, config):
    from engine.errors import QueueFull

    config.engine.max_queue_per_user = 3
    engine = await engine_factory()
    engine.pause()
    accepted, refused = 0, 0
    for _ in range(50):
        try:
            await engine.submit(discord_user("flood"), parse_command("x", LIMITS).to_request(
                LIMITS, random.Random(0)), ORIGIN)
            accepted += 1
        except QueueFull:
            refused += 1
    other = await engine.submit(discord_user("calm"), parse_command("y", LIMITS).to_request(
        LIMITS, random.Random(0)), ORIGIN)
    assert (accepted, refused) == (3, 47) and other.position() == 2
    engine.resume()
    assert await other.wait() is JobStatus.FINISHED
