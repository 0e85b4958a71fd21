"""The console in Chinese (issue 15): ``/language zh`` there as in a chat, so every reply can be
read without a chat token; the console's own sentences (its greeting, a job's line, where its
images were saved, its usage lines) are translated too, and a job recovered after a restart is
said in the console's language."""

from __future__ import annotations

import asyncio
import io
import re

import pytest

from bot import i18n
from bot.console import ConsoleAdapter
from engine.backends.dry_run import DryRunBackend

CJK = re.compile(r"[\u4e00-\u9fff]")
# what stays ASCII in a Chinese answer: commands and options, placeholders, numbers, "PNG"...
ASCII_OK = {"imagine", "seed", "steps", "vary", "upscale", "queue", "cancel", "limits", "status",
            "stats", "pause", "resume", "limit", "styles", "language", "help", "quit", "subtle",
            "strong", "discord", "telegram", "unlimited", "default", "auto", "GPU", "PNG",
            "JPEG", "WebP", "LoRA", "NAME", "WxH", "Discord", "Telegram", "options", "prompt",
            "size", "guidance", "strength", "style", "image", "aspect", "console", "local",
            "none"}


@pytest.fixture(autouse=True)
def english_after() -> None:
    yield
    i18n.use("en")


def english_words(text: str) -> set[str]:
    return set(re.findall(r"(?<![-/<\[])\b[A-Za-z]{3,}\b", text)) - ASCII_OK


async def run_lines(adapter: ConsoleAdapter, out: io.StringIO, *lines: str) -> str:
    """Each line through the console's reader, as typed; what it printed for them."""
    done = asyncio.Event()
    adapter.on_quit = done.set
    adapter.stdin = io.StringIO("".join(f"{line}\n" for line in lines) + "/quit\n")
    start = len(out.getvalue())
    adapter._reader = asyncio.create_task(adapter._read_lines())
    await asyncio.wait_for(done.wait(), 10)
    await adapter.followers.wait_all()
    return out.getvalue()[start:]


async def test_every_console_reply_in_chinese_after_language_zh(engine_factory):
    engine = await engine_factory(None, DryRunBackend())
    out = io.StringIO()
    adapter = ConsoleAdapter(engine, stdin=io.StringIO(), stdout=out)
    said = await run_lines(adapter, out, "/language zh")
    assert said == "本聊天的回复语言已设为 中文。\n"
    said = await run_lines(
        adapter, out, "/imagine 雪中的红狐狸 --seed 5 --steps 2", "/imagine 狐狸 --n 2 --seed 8",
        "/queue", "/limits", "/status", "/stats", "/help", "/styles", "/language",
        "/vary 1", "/upscale", "/vary nosuchjob 1", "/limit someone 2", "/limit telegram:42 3",
        "/pause", "/resume", "/cancel", "/foo", "/imagine 狐狸 --steps 999")
    lines = said.splitlines()
    job = next(line for line in lines if line.startswith("任务 ") and "种子 5，" in line)
    job_id = job.removeprefix("任务 ").split("：")[0]
    assert job == f"任务 {job_id}：种子 5，2 步，1024×1024。"
    assert any(re.fullmatch(r"任务 \w+：种子 8–9，\d+ 步，1024×1024。", line) for line in lines)
    saved = [line for line in lines if line.startswith(f"[{job_id}] 已保存到 ")]
    assert len(saved) == 1 and saved[0].endswith(".png")
    assert f"[{job_id}] ✅ 雪中的红狐狸" in said and "种子 5 · 2 步 · 1024×1024" in said
    assert "用法：/vary <任务编号> <图片序号> [subtle|strong]" in lines
    assert "用法：/upscale <任务编号> <图片序号>" in lines
    assert "用法：/limit <discord|telegram>:<用户 ID> <每个时段的图片数 | 0（禁止）| unlimited | " \
           "default>" in lines
    assert any(line.startswith("队列：") for line in lines)
    assert any(line.startswith("📊 过去一天：生成了 ") for line in lines)
    assert any(line.startswith("不认识 /foo。") for line in lines)
    assert "用法：/language zh|en|auto（管理员）：设置机器人在本聊天中的回复语言。当前：中文。" \
        in lines
    assert any(line.startswith("⚠️ --steps：") for line in lines)  # the grammar's error
    shown = "\n".join(line for line in lines if "已保存到" not in line)  # (a folder's name)
    assert not english_words(shown), english_words(shown)
    assert all(CJK.search(line) for line in lines if line and not line.startswith("  --")), \
        [line for line in lines if not CJK.search(line)]

    said = await run_lines(adapter, out, "/language en", "/imagine a fox --seed 3 --steps 1")
    assert said.startswith("Replies in this chat are now in English.\nJob ")
    assert ": seed 3, 1 steps, 1024×1024." in said and " saved to " in said
    assert not CJK.search(said)


async def test_a_recovered_job_and_the_greeting_are_in_the_consoles_language(engine_factory):
    before = await engine_factory(None, DryRunBackend())
    first = ConsoleAdapter(before, stdin=io.StringIO(), stdout=io.StringIO())
    await first.handle_line("/language zh")
    before.pause()  # the bot stops before the job runs
    job = await first.imagine("雪中的红狐狸 --seed 7 --steps 1")
    await first.stop()
    await before.shutdown(grace_s=0)

    i18n.use("en")  # the task that starts the adapters: its own language stays
    after = await engine_factory(None, DryRunBackend())
    assert [j.id for j in after.recovered_jobs("console")] == [job.id]
    out = io.StringIO()
    console = ConsoleAdapter(after, stdin=io.StringIO(), stdout=out)
    console._start_reader_thread = lambda: asyncio.Queue()  # nobody types
    await console.start()
    await console.followers.wait_all()
    await console.stop()
    assert i18n.current() == "en"
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("输入 /imagine <提示词> ") and "/language" in lines[0]
    assert f"[{job.id}] ✅ 雪中的红狐狸" in lines
    assert "种子 7 · 1 步 · 1024×1024" in out.getvalue()
    assert any(line.startswith(f"[{job.id}] 已保存到 ") for line in lines)


async def test_the_default_language_applies_to_the_console(engine_factory, config):
    config.bot.default_language = "zh"
    engine = await engine_factory(config, DryRunBackend())
    out = io.StringIO()
    console = ConsoleAdapter(engine, stdin=io.StringIO(), stdout=out)
    console._start_reader_thread = lambda: asyncio.Queue()
    await console.start()
    await console.handle_line("/language")
    await console.stop()
    assert out.getvalue().splitlines()[1] == ("用法：/language zh|en|auto（管理员）：设置机器人在"
                                              "本聊天中的回复语言。当前：每个人自己的语言。")
