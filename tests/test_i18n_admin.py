"""The admins' texts in Chinese (issue 15): /stats, /status and a cluster's workers, in private
and in a group, word for word; the English stays as it was; what a variation's or an upscale's
caption says it came from."""

from __future__ import annotations

import re

import pytest

from bot import i18n, render
from engine.backends import ModelState
from engine.cluster.messages import WorkerInfo
from engine.engine import Health
from engine.job import JobResult
from engine.request import Source
from engine.stats import PeriodStats, UsageStats, UserUse
from tests.conftest import make_request

CJK = re.compile(r"[\u4e00-\u9fff]")
OOM = ("The GPU ran out of memory for this image; try a smaller --size, or ask again when the "
       "bot is less busy.")


@pytest.fixture(autouse=True)
def english_after() -> None:
    yield
    i18n.use("en")


def english_words(text: str, *allowed: str) -> set[str]:
    """Words of three or more Latin letters, less the names and ids the admin texts show as
    they are."""
    return set(re.findall(r"\b[A-Za-z]{3,}\b", text)) - set(allowed)


def usage() -> UsageStats:
    day = PeriodStats("the last day", images=5, jobs=6, gpu_s=42.0, failures=1, wait_p50_s=3.2,
                      per_image_p50_s=7.5,
                      top_users=(UserUse("telegram:42", "Alice", 4, 30.0),
                                 UserUse("discord:7", "", 1, 12.0)),
                      causes=((OOM, 1),))
    week = PeriodStats("the last 7 days", images=9, jobs=9, gpu_s=4000.0, failures=0,
                       wait_p50_s=None, per_image_p50_s=None, top_users=(), causes=())
    return UsageStats((day, week))


class Running:
    id = "ab12cd34"

    class user:  # noqa: N801  (a job's user, as Health names it)
        key = "telegram:42"


def health(*, paused: bool = False) -> Health:
    workers = (WorkerInfo("big", "H100", "flux", 2048 * 2048, 4, (), 3, "", 0.0, 90.0),
               WorkerInfo("small", "H100", "flux", 1_200_000, 1, ("anime", "ink"), 1,
                          "ef56ab78", 0.0, 100.0))
    return Health(queued=3, running=Running(), paused=paused,  # type: ignore[arg-type]
                  accepting=True, finished=7, failed=2,
                  last_error="ab12cd34: RuntimeError('/home/admin/x')",
                  memory={"allocated_gb": 3.25}, workers=workers)


def test_stats_in_english_is_as_before() -> None:
    assert render.stats(usage()) == (
        "📊 The last day: 5 images made (6 asked for), GPU 42.0 s, 1 failed\n"
        "Median wait in the queue 3.2 s · median GPU time per image 7.5 s\n"
        "Top users: Alice (telegram:42) 4 (30.0 s), (discord:7) 1 (12.0 s)\n"
        "Failures: " + render.shorten(OOM, 80) + " ×1\n\n"
        "📊 The last 7 days: 9 images made (9 asked for), GPU 1 h 7 min, none failed\n"
        "Median wait in the queue – · median GPU time per image –")


def test_stats_in_chinese() -> None:
    i18n.use("zh")
    private = render.stats(usage())
    assert private.split("\n") == [
        "📊 过去一天：生成了 5 张图（共请求 6 个），GPU 用时 42.0 秒，1 个失败",
        "排队等待时间中位数 3.2 秒 · 每张图 GPU 用时中位数 7.5 秒",
        "用量最多的用户：Alice (telegram:42) 4 张（30.0 秒）, (discord:7) 1 张（12.0 秒）",
        "失败原因：" + render.shorten(i18n.gettext(OOM), 80) + " ×1",
        "",
        "📊 过去 7 天：生成了 9 张图（共请求 9 个），GPU 用时 1 小时 7 分钟，无失败",
        "排队等待时间中位数 – · 每张图 GPU 用时中位数 –"]
    assert CJK.search(private.split("\n")[3][5:])  # the stored cause is said in Chinese too
    assert not english_words(private, "Alice", "GPU", "telegram", "discord", "size")
    in_group = render.stats(usage(), private=False)
    assert "用量最多的用户：Alice 4 张（30.0 秒）, 某人 1 张（12.0 秒）" in in_group
    assert "失败：原因请在私聊中用 /stats 查看。" in in_group
    assert not english_words(in_group, "Alice", "GPU", "stats")


def test_status_and_workers_in_english_are_as_before() -> None:
    assert render.status(health(), now=100.0).split("\n") == [
        "Queue: 3 waiting",
        "Running: ab12cd34 for telegram:42",
        "Done: 7 finished, 2 failed",
        "Last error: ab12cd34: RuntimeError('/home/admin/x')",
        "GPU memory: allocated_gb 3.2",
        "Workers: 2",
        "• big — H100: largest 2048×2048, 4 at once, styles: none; 3 done, idle, seen 10 s ago",
        "• small — H100: largest 1,200,000 px, 1 at once, styles: anime, ink; 1 done, "
        "running ef56ab78, seen 0 s ago"]
    group = render.status(health(paused=True), private=False, now=100.0).split("\n")
    assert group[:4] == ["Queue: 3 waiting (paused)", "Running: job ab12cd34",
                         "Done: 7 finished, 2 failed",
                         "Last error: one (ask /status in a private chat)"]
    assert group[-1].startswith("• worker 2 — H100: ") and ", busy, " in group[-1]


def test_status_and_workers_in_chinese() -> None:
    i18n.use("zh")
    private = render.status(health(), now=100.0)
    assert private.split("\n") == [
        "队列：3 个等待中",
        "正在运行：telegram:42 的 ab12cd34",
        "已处理：7 个完成，2 个失败",
        "最近的错误：ab12cd34: RuntimeError('/home/admin/x')",  # the log's words, for an admin
        "GPU 显存：allocated_gb 3.2",
        "工作节点：2 个",
        "• big — H100：最大 2048×2048，一次最多 4 张，风格：无；已完成 3 个，空闲，10 秒前在线",
        "• small — H100：最大 1,200,000 像素，一次最多 1 张，风格：anime, ink；已完成 1 个，"
        "正在运行 ef56ab78，0 秒前在线"]
    group = render.status(health(paused=True), private=False, now=100.0)
    assert group.split("\n")[:4] == ["队列：3 个等待中（已暂停）", "正在运行：任务 ab12cd34",
                                     "已处理：7 个完成，2 个失败",
                                     "最近的错误：有一个（请在私聊中使用 /status 查看）"]
    assert "• 工作节点 1 — H100：" in group and "，忙碌，" in group
    assert "big" not in group and "small" not in group and "ef56ab78" not in group
    assert not english_words(group, "GPU", "status", "allocated_gb", "anime", "ink")  # styles
    quiet = Health(queued=0, running=None, paused=False, accepting=True, finished=0, failed=0,
                   last_error=None, memory={})
    assert render.status(quiet).split("\n") == ["队列：0 个等待中", "正在运行：无",
                                                "已处理：0 个完成，0 个失败", "最近的错误：无"]


@pytest.mark.parametrize(("source", "english", "chinese"), [
    (Source("variation", "ab12cd34", 2, "strong"), "variation (strong) of ab12cd34 #2",
     "ab12cd34 第 2 张图的强烈变化"),
    (Source("upscale", "ab12cd34", 3, "2"), "upscale 2× of ab12cd34 #3",
     "ab12cd34 第 3 张图放大 2 倍")])
def test_a_variations_or_upscales_caption_says_where_it_came_from(source: Source, english: str,
                                                                    chinese: str) -> None:
    result = JobResult.single(b"png", make_request("狐狸", seed=7).with_changes(
        derived_from=source), "", 1.0)
    assert render.caption(result).split("\n")[1].startswith(f"{english} · seed 7")
    i18n.use("zh")
    assert render.caption(result).split("\n")[1].startswith(f"{chinese} · 种子 7")


def test_status_says_how_the_model_runs_and_when_its_compile_failed() -> None:
    """A bot that fell back to eager blocks made every image slower with nothing but a log
    line to say so (the 16 GB card on 2026-12-07): /status says it, in both languages."""
    quiet = dict(queued=0, running=None, paused=False, accepting=True, finished=0, failed=0,
                 last_error=None, memory={})
    streamed = Health(**quiet, model=ModelState("low", 57, 39, compiled=True))
    eager = Health(**quiet, model=ModelState("balanced", 57, 57, compile_failed=True))
    resident = Health(**quiet, model=ModelState("max", 57, 57))
    dropped = Health(**quiet, model=ModelState("low", loaded=False))
    assert render.status(streamed).split("\n")[-1] == (
        "Model: preset low · 39 of 57 DiT blocks on the GPU · compiled")
    assert render.status(eager).split("\n")[-1] == (
        "Model: preset balanced · 57 of 57 DiT blocks on the GPU · not compiled: compiling "
        "failed, images are slower (see the log)")
    assert render.status(resident).split("\n")[-1] == (
        "Model: preset max · 57 of 57 DiT blocks on the GPU")
    assert render.status(dropped).split("\n")[-1] == (
        "Model: preset low · not loaded: the next image loads it again")
    assert "Model" not in render.status(Health(**quiet))  # the dry run: nothing to say
    i18n.use("zh")
    assert render.status(streamed).split("\n")[-1] == (
        "模型：预设 low · DiT 的 57 个块中有 39 个在 GPU 上 · 已编译")
    assert "未编译：编译失败" in render.status(eager, private=False)
    assert "未加载" in render.status(dropped)
