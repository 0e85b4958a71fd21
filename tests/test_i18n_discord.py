"""Discord in Chinese: the command sync carries zh-CN descriptions, a zh-CN user's /imagine with
full-width marks is answered in Chinese, an admin's /language for the channel wins, and after a
restart a recovered job and a lost command are answered in their channel's language."""

# ruff: noqa: F811  (the fixtures are imported from the adapter tests and used as arguments)
from __future__ import annotations

import re

from engine.png import read_parameters
from tests.fakes.discord_server import FakeUser
from tests.test_discord_adapter import (  # noqa: F401  (fixtures)
    ADMIN,
    ALICE,
    _text,
    a_command_cut_short,
    dconfig,
    final_upload,
    jobs_in_journal,
    posted_after_a_restart,
    private_answer,
    server,
    start_bot,
)

CJK = re.compile(r"[\u4e00-\u9fff]")
LI = FakeUser("444444444444444444", "li", locale="zh-CN")


async def test_the_sync_payload_carries_chinese_descriptions(server, start_bot):
    await start_bot()
    commands = {c["name"]: c for c in server.commands["global"]}
    imagine = commands["imagine"]
    assert imagine["description"].startswith("Make an image")
    assert CJK.search(imagine["description_localizations"]["zh-CN"])
    assert "zh-TW" in imagine["description_localizations"]
    prompt = next(o for o in imagine["options"] if o["name"] == "prompt")
    assert CJK.search(prompt["description_localizations"]["zh-CN"])
    assert "name_localizations" not in imagine or not imagine["name_localizations"]
    assert "language" in commands  # the admins' /language


async def test_a_chinese_imagine_is_answered_in_chinese(server, start_bot):
    await start_bot()
    sent = await server.slash("imagine", LI, prompt="雪中的红狐狸 ——seed 7")
    upload = await final_upload(server, sent)
    assert read_parameters(upload.files[0].data)["Seed"] == "7"
    texts = [_text(c) for c in server.calls_for(sent) if _text(c)]
    assert texts and all(CJK.search(t) for t in texts), texts
    assert "种子 7" in _text(upload)


async def test_an_admins_language_for_the_channel_wins(server, start_bot):
    await start_bot()
    answer = await server.slash("language", ADMIN, choice="en")
    await server.wait_for(lambda c: c.token == answer.token)
    sent = await server.slash("imagine", LI, prompt="雪中的红狐狸 ——seed 7")
    upload = await final_upload(server, sent)
    assert "seed 7" in _text(upload) and "种子" not in _text(upload)


async def test_a_bad_option_and_a_server_cap_are_said_in_chinese(server, start_bot, dconfig):
    """Issue 15's leftovers: the grammar's errors and the rate-limit refusals, with the wait."""
    dconfig.rate_limit.per_chat_images_per_window = 1
    await start_bot()
    bad = await private_answer(server, await server.slash("imagine", LI,
                                                          prompt="雪中的红狐狸 --size 10x10"))
    assert _text(bad) == f"⚠️ --size 10x10 太小了；每条边至少要 {dconfig.limits.min_side}。"
    await final_upload(server, await server.slash("imagine", ALICE, prompt="狐狸 --steps 1"))
    refused = await server.slash("imagine", LI, prompt="雪中的红狐狸 --steps 1")
    assert _text(await private_answer(server, refused)) == (
        "⚠️ 本服务器在这一小时内的 1 张图已经用完了；1 小时后可以再试。")


async def test_a_zh_users_job_recovered_after_a_restart_is_posted_in_chinese(
        server, start_bot, engine_factory, dconfig):
    """Issue 15: a job from before a restart has no interaction to set its language; it keeps
    the one it was asked in (the channel has none of its own, the default is English)."""
    restarted, post = await posted_after_a_restart(server, start_bot, engine_factory, dconfig,
                                                   LI, prompt="雪中的红狐狸 --seed 7 --steps 1")
    assert read_parameters(post.files[0].data)["Seed"] == "7"
    assert _text(post).startswith(f"<@{LI.id}> 雪中的红狐狸\n种子 7 · 1 步 · ")
    assert not re.search(r"\b[A-Za-z]{3,}\b", _text(post).replace(LI.name, "")), _text(post)
    record = (await jobs_in_journal(restarted, LI))[0]
    assert record.delivered_to.startswith(f"discord:channel/{server.channel_id}/message/")


async def test_a_command_a_crash_lost_is_told_to_ask_again_in_the_channels_language(
        server, start_bot, engine_factory, dconfig):
    first = await start_bot()
    answer = await server.slash("language", ADMIN, choice="zh")
    await server.wait_for(lambda c: c.token == answer.token)
    lost, handler = await a_command_cut_short(server, first, ALICE, "a lost fox --steps 1")
    handler.cancel()  # the "SIGKILL": the handler never gets further
    await first.stop()
    await first.engine.shutdown(grace_s=0)

    await start_bot(engine=await engine_factory(dconfig))
    told = [c for c in server.calls_for(lost) if c.name == "edit_original"]
    assert [_text(c) for c in told] == ["⚠️ 机器人在接收这条请求前重启了；请重新发送。"]
