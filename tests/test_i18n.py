"""The catalogues: every message the code uses has its words in English and Chinese, the Chinese
keeps every {field}, a Chinese reply has no English left, and the .mo files come from the .po."""

from __future__ import annotations

import os
import re
import string

import pytest
from babel.messages.pofile import read_po

from bot import i18n, render
from bot.i18n import catalog
from bot.i18n.extract import used_catalog
from engine.config import LimitsSection
from engine.errors import InvalidCommand, QueueFull
from engine.job import Failed, JobResult
from engine.rate_limit import Quota
from tests.conftest import make_request

CJK = re.compile(r"[\u4e00-\u9fff]")
USED = [m.id for m in used_catalog() if m.id]


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


@pytest.fixture(autouse=True)
def english_after() -> None:
    yield
    i18n.use("en")


@pytest.mark.parametrize("language", ["en", "zh"])
def test_every_message_used_has_words_in_both_catalogues(language: str) -> None:
    with catalog.po_path(language).open("rb") as f:
        po = read_po(f)
    assert len(USED) > 150
    for msgid in USED:
        entry = po.get(msgid)
        assert entry is not None and not entry.fuzzy, f"{language}: no entry for {msgid!r}"
        words = entry.string if isinstance(entry.string, tuple) else (entry.string,)
        assert all(words), f"{language}: empty translation of {msgid!r}"
        singular = msgid[0] if isinstance(msgid, tuple) else msgid
        for text in words:  # a translation may not drop or invent a {field}
            assert _fields(text) == _fields(singular), (language, msgid, text)


def test_every_chinese_message_is_chinese() -> None:
    zh = i18n.translation("zh")
    for msgid in USED:
        text = zh.ngettext(*msgid, 2) if isinstance(msgid, tuple) else zh.gettext(msgid)
        assert CJK.search(text), f"no Chinese in the translation of {msgid!r}: {text!r}"


def _replies() -> list[str]:
    """The messages users see most, rendered with sample values."""
    request = make_request(prompt="雪中的红狐狸", seed=7, steps=4)
    quota = Quota(limit=10, used=7, remaining=3, resets_at=600.0)
    return [
        render.queued(1), render.queued(3), render.started(request),
        render.progress(2, 4, 30.0), render.progress(3, 4, 0.5),
        render.caption(JobResult.single(b"png", request, "", 1.5), "狐狸爱好者"),
        render.cancelled(), render.cancelled(by_owner=False), render.failed(Failed(
            "The GPU ran out of memory for this image; try a smaller --size, or ask again "
            "when the bot is less busy.")),
        render.error(QueueFull(
            "You already have {mine} requests waiting (the most is {cap}); please wait for "
            "one to finish or cancel one.", mine=3, cap=3)),
        render.error(InvalidCommand("This image is an upscale already.")),
        render.quota(quota, 0.0), render.queue_list([]), render.usage(LimitsSection()),
        render.admin_only(), render.chat_not_allowed(), render.internal_error(),
        render.button_label("reroll"), render.button_label("more"),
        render.button_label("cancel"), render.vary_label("subtle"), render.upscale_label(),
        render.grid_actions(4), render.blocked(2), render.undelivered(3600.0),
        render.language_set("zh"), render.language_usage(None), render.rerolling(8),
    ]


def test_a_chinese_reply_has_no_english_left() -> None:
    i18n.use("en")
    english = _replies()
    i18n.use("zh")
    chinese = _replies()
    for en, zh in zip(english, chinese, strict=True):
        assert zh != en and CJK.search(zh), zh
        # what stays ASCII in Chinese: option names, commands, numbers, sizes, "PNG"
        words = set(re.findall(r"(?<![-/<])\b[A-Za-z]{3,}\b", zh)) - {
            "PNG", "JPEG", "WebP", "LoRA", "NAME", "WxH", "Discord", "Telegram", "imagine",
            "options", "unlimited", "default", "auto", "prompt", "seed", "steps", "size",
            "guidance", "strength", "style", "queue", "cancel", "limits", "language", "styles",
            "resume",
            "image", "aspect"}
        assert not words, (zh, words)


def test_a_stale_or_missing_mo_is_compiled_from_the_po(tmp_path, monkeypatch) -> None:
    """``python -m bot.i18n`` writes .mo files for a build; without them (a fresh clone, CI)
    or with one older than its .po, the .po is compiled in memory with Babel."""
    folder = tmp_path / "zh_Hans" / "LC_MESSAGES"
    folder.mkdir(parents=True)
    po = folder / "bot.po"
    po.write_bytes(catalog.po_path("zh").read_bytes())
    monkeypatch.setattr(catalog, "LOCALE_DIR", tmp_path)
    monkeypatch.setattr(catalog, "FOLDERS", {"zh": "zh_Hans"})
    assert catalog.load("zh").gettext("🛑 Cancelled.") == "🛑 已取消。"  # no .mo at all
    (written,) = catalog.compile_all()
    assert written == folder / "bot.mo" and written.read_bytes().startswith(b"\xde\x12\x04\x95")
    assert catalog.load("zh").gettext("🛑 Cancelled.") == "🛑 已取消。"  # the .mo
    po.write_text(po.read_text().replace('msgstr "🛑 已取消。"', 'msgstr "🛑 取消了。"'))
    old = po.stat().st_mtime - 60
    os.utime(written, (old, old))  # the .mo is older than the edited .po: not used
    assert catalog.load("zh").gettext("🛑 Cancelled.") == "🛑 取消了。"


@pytest.mark.parametrize(("code", "language"), [
    ("zh-CN", "zh"), ("zh-TW", "zh"), ("zh", "zh"), ("zh-hans", "zh"), ("zh_CN", "zh"),
    ("en-US", "en"), ("en-GB", "en"), ("fr", None), (None, None), ("", None)])
def test_platform_language_codes(code: str | None, language: str | None) -> None:
    assert i18n.language_of(code) == language
