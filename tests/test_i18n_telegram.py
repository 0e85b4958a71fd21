"""Telegram in Chinese: the command menus are published for "zh" too, a zh user's /imagine with
full-width marks is answered in Chinese, and an admin's /language for the chat wins."""

# ruff: noqa: F811  (the fixtures are imported from the adapter tests and used as arguments)
from __future__ import annotations

import re

from tests.test_telegram_adapter import (  # noqa: F401  (fixtures)
    ADMIN,
    ALICE,
    GROUP,
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
