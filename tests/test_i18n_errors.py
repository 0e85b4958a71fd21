"""Issue 15's leftovers: the /imagine option errors and the rate-limit refusals are said in the
reader's language, waits and periods included, while ``str(err)`` and English replies keep
their exact English words."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest

from bot import i18n, render
from engine import quota_text
from engine.cluster import capability
from engine.cluster.messages import WorkerInfo
from engine.config import LimitsSection
from engine.errors import N_, EngineError, InvalidCommand, NoWorkerCanRun, Phrase, RateLimited
from engine.grammar import ParsedCommand, parse_imagine
from engine.job import Failed
from engine.rate_limit import RateLimiter
from engine.request import ImageRequest, User
from engine.store import Store
from tests.conftest import FakeClock
from tests.test_quotas import ALICE, BOB, ask, limiter, request

CJK = re.compile(r"[\u4e00-\u9fff]")
LIMITS = LimitsSection()


@pytest.fixture(autouse=True)
def english_after() -> None:
    yield
    i18n.use("en")


def english_words(text: str) -> set[str]:
    """Latin words of three letters or more, other than options (--seed) and commands."""
    return set(re.findall(r"(?<![-/<])\b[A-Za-z]{3,}\b", text))


def said(exc: Exception, language: str) -> str:
    i18n.use(language)
    return render.error(exc)


def grammar_error(text: str) -> InvalidCommand:
    with pytest.raises(InvalidCommand) as caught:
        parse_imagine(text, LIMITS)
    return caught.value


# -- the /imagine grammar ----------------------------------------------------------------------
@pytest.mark.parametrize(("command", "english", "chinese"), [
    ("狐狸 --steps 999", "--steps must be a whole number from 1 to 50; “999” is out of range.",
     "--steps：必须是 1 到 50 之间的整数；“999” 超出了范围。"),
    ("狐狸 --sed 3", "Unknown option --sed; did you mean --seed?",
     "没有选项 --sed；你是想用 --seed 吗？"),
    ("狐狸 --size 10x10", "--size 10x10 is too small; each side must be at least 256.",
     "--size 10x10 太小了；每条边至少要 256。"),
    ("", "The prompt is empty; please say what to draw, e.g. /imagine a red fox in the snow "
         "--seed 7.", "提示词是空的；请写上要画什么，例如 /imagine 雪中的红狐狸 --seed 7。"),
    ("狐狸 --seed 1 --seed 2", "--seed was given twice; please give it only once.",
     "--seed 写了两次；请只写一次。"),
])
def test_a_grammar_error_in_chinese_and_unchanged_in_english(command: str, english: str,
                                                              chinese: str) -> None:
    error = grammar_error(command)
    assert str(error) == english
    assert said(error, "en") == f"⚠️ {english}"
    assert said(error, "zh") == f"⚠️ {chinese}"


def test_a_label_phrase_is_said_in_chinese_too() -> None:
    """A typed option (Discord's fields) and the defaults' check call the option by a phrase."""
    with pytest.raises(InvalidCommand) as typed:
        ParsedCommand("狐狸").merged_with(LIMITS, seed=-5)
    assert str(typed.value) == ("The seed option must be a whole number from 0 to 4294967295; "
                                "-5 is out of range.")
    assert said(typed.value, "zh") == ("⚠️ 选项 seed：必须是 0 到 4294967295 之间的整数；"
                                       "-5 超出了范围。")
    with pytest.raises(InvalidCommand) as seed:
        dataclasses.replace(ParsedCommand("狐狸"), seed=4294967295, count=4).to_request(LIMITS)
    assert str(seed.value).startswith("The seed (with --n 4) must be a whole number")
    assert said(seed.value, "zh").startswith("⚠️ 种子（配合 --n 4）：必须是 0 到 4294967292 "
                                             "之间的整数")


@pytest.mark.parametrize("command", [
    "狐狸 --steps 0", "狐狸 --steps 九", "狐狸 --n 9", "狐狸 --guidance 99",
    "狐狸 --strength 2", "狐狸 --strength 0.5", "狐狸 --size 5000x5000", "狐狸 --size 1000x1000",
    "狐狸 --size 大", "狐狸 --size 99999999x2", "狐狸 --ar 1024x768", "狐狸 --ar 宽",
    "狐狸 --ar 0:1", "狐狸 --ar 9:1", "狐狸 --ar 16:9 --size 1024x1024",
    "狐狸 --cfg 4 --guidance 4", "狐狸 --zzz 1", "狐狸 --seed", "狐狸 --seed 3 雪",
    "狐狸 --style 水彩", "狐" * 5000, "狐狸 --seed 99999999999999999999999",
])
def test_no_english_is_left_in_a_chinese_grammar_error(command: str) -> None:
    error = grammar_error(command)
    chinese = said(error, "zh")
    assert chinese != said(error, "en") and CJK.search(chinese), chinese
    assert not english_words(chinese) - {"watercolor"}, chinese  # the example of a style


# -- rate limits -------------------------------------------------------------------------------
async def refusal(limits: RateLimiter, store: Store, req: ImageRequest | None = None,
                  user: User = ALICE) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await ask(limits, store, user, req or request())
    return caught.value


async def test_a_user_whose_images_are_used_up_hears_it_in_chinese(store: Store,
                                                                   clock: FakeClock) -> None:
    limits = limiter(store, clock, mode="images", per_window=2)
    await ask(limits, store, ALICE, request(count=2))
    clock.now += 600
    error = await refusal(limits, store)
    assert str(error) == ("You have used your 2 images for this hour; you can ask again in 50 "
                          "minutes.")
    assert said(error, "en") == f"⚠️ {error}"
    assert said(error, "zh") == "⚠️ 你在这一小时内的 2 张图已经用完了；50 分钟后可以再试。"


async def test_a_server_cap_is_said_in_chinese(store: Store, clock: FakeClock) -> None:
    limits = limiter(store, clock, mode="images", per_window=10, per_chat=3)
    await ask(limits, store, ALICE, request(count=3))
    error = await refusal(limits, store, user=BOB)
    assert str(error).startswith("This server has used its 3 images for this hour")
    assert said(error, "zh") == "⚠️ 本服务器在这一小时内的 3 张图已经用完了；1 小时后可以再试。"


async def test_a_priced_request_too_big_for_the_limit_is_said_in_chinese(
        store: Store, clock: FakeClock) -> None:
    limits = limiter(store, clock, per_window=2)  # gpu_seconds
    error = await refusal(limits, store, request(steps=50))  # 2.5 images' worth
    assert str(error).startswith("This asks for 2.5 images' worth, more than your limit of 2")
    assert said(error, "zh") == ("⚠️ 这次需要 2.5 张图的额度，超过了你的上限（这一小时内 "
                                 "2 张图的额度）；请减少步数、缩小尺寸或减小 --n。")


async def test_a_daily_cap_with_some_left_is_said_in_chinese(store: Store,
                                                             clock: FakeClock) -> None:
    limits = limiter(store, clock, mode="images", per_window=2, per_day=3)
    await ask(limits, store, ALICE, request(count=2))
    clock.now += 3600
    error = await refusal(limits, store, request(count=2))
    assert str(error) == ("You have 1 image left for the last 24 hours and this asks for 2; try "
                          "--n 1, or ask again in 23 hours.")
    assert said(error, "zh") == ("⚠️ 你在过去 24 小时内还剩 1 张图，而这次要 2 张；请试试 --n 1，"
                                 "或 23 小时后再试。")


@pytest.mark.parametrize("refuse", [
    lambda: quota_text.partial(quota_text.Who.chat("group"), 0.45, 1.0, quota_text.window(21600),
                               90, priced=True),
    lambda: quota_text.too_big(quota_text.Who.chat("server"), 3, 4, quota_text.window(60),
                               priced=False),
    lambda: quota_text.too_big(quota_text.Who.chat("group"), 3, 4.5, quota_text.window(5400),
                               priced=True),
    lambda: quota_text.used_up(quota_text.Who.chat("group"), 1, quota_text.window(172800), 45,
                               priced=True, asked=0.5),
    quota_text.zero_limit,
])
def test_no_english_is_left_in_a_chinese_refusal(refuse: Callable[[], Phrase]) -> None:
    error = RateLimited(refuse(), retry_at=0.0)
    chinese = said(error, "zh")
    assert CJK.search(chinese) and not english_words(chinese), chinese
    assert said(error, "en") == f"⚠️ {error}"


@pytest.mark.parametrize(("seconds", "chinese"), [
    (0.2, "1 秒"), (40, "40 秒"), (61, "2 分钟"), (3600, "1 小时"), (3601, "1 小时零 1 分钟"),
    (5400, "1 小时零 30 分钟"), (90000, "25 小时"),
])
def test_a_wait_in_chinese(seconds: float, chinese: str) -> None:
    i18n.use("zh")
    assert quota_text.wait(seconds).say(i18n.gettext, i18n.ngettext) == chinese


@pytest.mark.parametrize(("seconds", "chinese"), [
    (3600, "这一小时"), (21600, "过去 6 小时"), (5400, "过去 90 分钟"), (86400, "这一天"),
    (172800, "过去 2 天"), (45, "过去 45 秒"),
])
def test_a_window_in_chinese(seconds: float, chinese: str) -> None:
    i18n.use("zh")
    assert quota_text.window(seconds).say(i18n.gettext, i18n.ngettext) == chinese


# -- the cluster's refusals and a job's failure --------------------------------------------------
SMALL = WorkerInfo("w1", "RTX 3060", "flux", max_pixels=512 * 512, max_count=2,
                   styles=("ink",))


@pytest.mark.parametrize("ask_for", [
    dict(width=1024, height=1024), dict(width=512, height=512, count=4),
    dict(width=512, height=512, style="watercolor")])
def test_a_job_no_worker_can_run_is_refused_in_the_readers_language(ask_for) -> None:
    wanted = dataclasses.replace(request(), **ask_for)
    error = NoWorkerCanRun(capability.refusal([SMALL], wanted))
    chinese = said(error, "zh")
    names = {"ink", "watercolor"}  # style names are the admin's words, shown as they are
    assert CJK.search(chinese) and not english_words(chinese) - names, chinese
    assert said(error, "en") == f"⚠️ {error}" and "None of the image workers online" in str(error)
    nobody = NoWorkerCanRun(capability.refusal([], wanted))
    assert str(nobody).startswith("No image worker is connected right now")
    assert not english_words(said(nobody, "zh"))


def test_a_failed_job_is_told_in_the_readers_language_with_its_fields() -> None:
    """The engine keeps the failure's phrase on the event (the journal keeps its English)."""
    lost = EngineError(N_("Image {number} of this job was lost on its way back."), number=3)
    event = Failed(str(lost), lost.phrase)
    i18n.use("zh")
    assert render.failed(event) == "⚠️ 这个任务的第 3 张图在传回途中丢失了。"
    i18n.use("en")
    assert render.failed(event) == "⚠️ Image 3 of this job was lost on its way back."
    i18n.use("zh")  # recovered from the journal: the English sentence, looked up as it is
    journalled = Failed("The picture this image starts from is no longer there; please send it "
                        "again.")
    assert render.failed(journalled) == "⚠️ 这张图所依据的图片已经不在了；请重新发送。"
