"""Telegram in Chinese: the command menus are published for "zh" too, a zh user's /imagine with
full-width marks is answered in Chinese, an admin's /language for the chat wins, the admins' own
texts are Chinese, and a job recovered after a restart is said in its chat's language."""

# ruff: noqa: F811  (the fixtures are imported from the adapter tests and used as arguments)
from __future__ import annotations

import re

from engine.backends.dry_run import DryRunBackend
from engine.grammar import parse_command
from engine.png import read_parameters
from engine.request import Origin, User
from tests.test_telegram_adapter import (  # noqa: F401  (fixtures)
    ADMIN,
    ALICE,
    GROUP,
    delivered,
    reply_to,
    start_bot,
    tg,
    tg_config,
)

CJK = re.compile(r"[\u4e00-\u9fff]")
LI = 44


async def test_the_menus_are_set_for_chinese_too(tg, start_bot):
    await start_bot()
    menus = {(m.params.get("language_code"), "scope" in m.params): m
             for m in tg.calls_to("setMyCommands")}
    assert set(menus) == {(None, False), ("zh", False), (None, True), ("zh", True)}
    everyone_zh = menus[("zh", False)].json("commands")
    assert [c["command"] for c in everyone_zh] == \
        [c["command"] for c in menus[(None, False)].json("commands")]  # names stay English
    assert all(CJK.search(c["description"]) for c in everyone_zh)
    assert "language" in [c["command"] for c in menus[("zh", True)].json("commands")]


async def test_a_chinese_imagine_is_answered_in_chinese(tg, start_bot):
    await start_bot()
    tg.message("/imagine 雪中的红狐狸 ——seed 7", chat_id=LI, user_id=LI, language_code="zh-hans")
    photo = await tg.wait_for("sendPhoto")
    assert "种子 7" in photo.params["caption"] and "雪中的红狐狸" in photo.params["caption"]
    statuses = [c.params.get("text", "") for c in tg.calls_to("sendMessage")
                + tg.calls_to("editMessageText")]
    assert statuses and all(CJK.search(t) for t in statuses), statuses


async def test_a_chinese_refusal_and_an_admins_language_for_the_chat(tg, start_bot):
    await start_bot()
    tg.message("/imagine 雪中的红狐狸 --style nope", chat_id=GROUP, user_id=LI,
               chat_type="supergroup", language_code="zh")
    refusal = (await tg.wait_for("sendMessage")).params["text"]
    assert refusal.startswith("⚠️ 没有风格 'nope'"), refusal
    tg.message("/language en", chat_id=GROUP, user_id=ADMIN, chat_type="supergroup",
               language_code="zh")
    done = (await tg.wait_for("sendMessage", 2)).params["text"]
    assert done == "Replies in this chat are now in English."
    tg.message("/imagine 雪中的红狐狸 ——seed 7", chat_id=GROUP, user_id=LI,
               chat_type="supergroup", language_code="zh")
    photo = await tg.wait_for("sendPhoto")
    assert "seed 7" in photo.params["caption"] and "种子" not in photo.params["caption"]


async def test_a_bad_option_and_a_group_cap_are_said_in_chinese(tg, tg_config, start_bot):
    """Issue 15's leftovers: the grammar's errors and the rate-limit refusals, with the wait."""
    tg_config.rate_limit.per_chat_images_per_window = 1
    await start_bot()
    most = tg_config.limits.steps_max
    tg.message("/imagine 雪中的红狐狸 --steps 999", chat_id=GROUP, user_id=LI,
               chat_type="supergroup", language_code="zh")
    bad = (await tg.wait_for("sendMessage")).params["text"]
    assert bad == f"⚠️ --steps：必须是 1 到 {most} 之间的整数；“999” 超出了范围。"
    tg.message("/imagine 狐狸 --steps 1", chat_id=GROUP, user_id=ALICE, chat_type="supergroup")
    await tg.wait_for("sendPhoto")
    tg.message("/imagine 雪中的红狐狸 --steps 1", chat_id=GROUP, user_id=LI,
               chat_type="supergroup", language_code="zh")
    refusal = await tg.wait_for("sendMessage", where=lambda c: "本群" in c.params["text"])
    assert refusal.params["text"] == "⚠️ 本群在这一小时内的 1 张图已经用完了；1 小时后可以再试。"


async def test_a_chinese_chats_job_finished_while_the_bot_was_down_is_delivered_in_chinese(
        tg, start_bot, tg_config, engine_factory):
    """Issue 15: recovered jobs were said in the default language (no live update set one)."""
    before = await engine_factory(tg_config, DryRunBackend())
    await before.chat_languages.set(f"telegram:{LI}", "zh")  # the chat's /language zh
    request = parse_command("雪中的红狐狸 --seed 7 --steps 2", tg_config.limits).to_request(
        tg_config.limits)
    job = await before.submit(User("telegram", str(LI), "Li"), request,
                              Origin("telegram", chat_id=str(LI), message_id="77"))
    await job.wait()  # finished while no adapter was there to deliver it
    await before.shutdown(grace_s=1)

    after = await engine_factory(tg_config, DryRunBackend())
    await start_bot(engine=after)
    photo = await tg.wait_for("sendPhoto")
    assert reply_to(photo) == 77 and read_parameters(photo.upload("photo").data)["Seed"] == "7"
    caption = photo.params["caption"]
    assert caption.startswith("雪中的红狐狸\n种子 7 · 2 步 · 1024×1024 · ")
    assert caption.endswith(" · 由 Li 请求")
    assert not re.search(r"[A-Za-z]{3,}", caption.replace("Li", "")), caption
    await delivered(after, job.id)


async def test_a_zh_users_job_queued_before_a_restart_keeps_chinese_status_and_caption(
        tg, start_bot, tg_config, engine_factory):
    """The chat has no language of its own and the bot's default is English: the job keeps the
    language of the user who asked (Telegram's language_code), after the restart too."""
    before = await engine_factory(tg_config, DryRunBackend())
    before.pause()
    _, adapter = await start_bot(engine=before)
    tg.message("/imagine 雪中的红狐狸 --seed 9 --steps 2", chat_id=GROUP, user_id=LI,
               chat_type="supergroup", language_code="zh-hans")
    status = await tg.wait_for("sendMessage")
    assert status.params["text"] == "⏳ 已排队：下一个就是你。"
    status_id = tg.sent("sendMessage")[0]["message_id"]
    await adapter.stop()
    await before.shutdown(grace_s=0)

    after = await engine_factory(tg_config, DryRunBackend())
    _, restarted = await start_bot(engine=after)
    photo = await tg.wait_for("sendPhoto")
    assert photo.params["caption"].startswith("雪中的红狐狸\n种子 9 · 2 步 · ")
    edits = [c.params["text"] for c in tg.calls_to("editMessageText")
             if int(c.params["message_id"]) == status_id]
    assert edits and all(CJK.search(text) for text in edits), edits
    assert len(tg.calls_to("sendMessage")) == 1  # the old status message, edited

    tg.message("/imagine a fox --steps 1", chat_id=GROUP, user_id=ALICE, chat_type="supergroup")
    english = await tg.wait_for("sendPhoto", 2)  # the adapter's own task stayed English
    assert "seed" in english.params["caption"] and not CJK.search(english.params["caption"])


async def test_status_and_stats_for_a_chinese_admin(tg, start_bot):
    engine, _ = await start_bot()
    tg.message("/imagine 狐狸 --steps 1", chat_id=ADMIN, user_id=ADMIN, language_code="zh")
    await tg.wait_for("sendPhoto")
    tg.message("/status", chat_id=ADMIN, user_id=ADMIN, language_code="zh")
    status = (await tg.wait_for("sendMessage", where=lambda c: "队列" in c.params["text"])
              ).params["text"]
    assert status.split("\n")[:4] == ["队列：0 个等待中", "正在运行：无",
                                      "已处理：1 个完成，0 个失败", "最近的错误：无"]
    tg.message("/stats", chat_id=GROUP, user_id=ADMIN, chat_type="supergroup",
               language_code="zh")
    stats = (await tg.wait_for("sendMessage", where=lambda c: "📊" in c.params["text"])
             ).params["text"]
    assert stats.startswith("📊 过去一天：生成了 1 张图（共请求 1 个），GPU 用时 ")
    assert "用量最多的用户：Ada 1 张（" in stats and f"telegram:{ADMIN}" not in stats
