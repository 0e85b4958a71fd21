"""The opt-in NSFW check (``[moderation]``): its config, the NudeNet wrapper on real images made
here, the policy per chat, where the check runs (never the event loop or the GPU worker), and a
restart (undelivered results are checked again)."""

from __future__ import annotations

import io
import logging
import sys
import threading

import pytest
from PIL import Image

from bot.doctor import run_doctor
from engine import moderation
from engine.config import Config, ConfigError, config_from_dict
from engine.engine import Engine
from engine.job import Finished, JobStatus
from engine.moderation import DetectorUnavailable, Moderator, Policy
from engine.request import Origin
from tests.conftest import RecordingBackend, discord_user, make_request
from tests.fakes.detector import FakeDetector

GUILD = Origin("discord", chat_id="100", extra={"guild_id": "555"})
GROUP = Origin("telegram", chat_id="-1001234")


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def flat(colour: tuple[int, int, int], size: int = 1024) -> bytes:
    return png_of(Image.new("RGB", (size, size), colour))


# -- config ----------------------------------------------------------------------------------
def test_the_check_is_off_by_default_and_blocks_exposed_nudity_when_on() -> None:
    mod = Config().moderation
    assert mod.nsfw_check is False and mod.policy == "block" and mod.threshold == 0.5
    assert set(mod.labels) == {"FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
                               "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED", "ANUS_EXPOSED"}
    cfg = config_from_dict({"moderation": {"nsfw_check": True, "policy": "spoiler",
                                           "discord_guilds": {"555": "block"},
                                           "telegram_chats": {"-1001234": "allow"}}})
    assert cfg.moderation.discord_guilds == {"555": "block"}
    assert cfg.moderation.telegram_chats == {"-1001234": "allow"}


@pytest.mark.parametrize(("section", "message"), [
    ({"policy": "hide"}, "moderation.policy = 'hide' is not allowed: allow or spoiler or block"),
    ({"threshold": 0}, "moderation.threshold = 0.0 is not allowed: more than 0, at most 1"),
    ({"threshold": 1.5}, "moderation.threshold = 1.5 is not allowed"),
    ({"labels": []}, "moderation.labels = [] is not allowed: at least one NudeNet label"),
    ({"labels": ["NUDE"]}, "moderation.labels = 'NUDE' is not allowed: NudeNet's labels: "),
    ({"discord_guilds": {"my server": "block"}}, "keys are numeric ids"),
    ({"telegram_chats": {"-100": "hide"}},
     "moderation.telegram_chats.-100 = 'hide' is not allowed: allow or spoiler or block"),
    ({"telegram_chats": ["-100"]}, "must be a table"),
    ({"nsfw_chek": True}, "did you mean 'nsfw_check'?"),
])
def test_bad_moderation_settings_name_the_key_and_what_is_allowed(section, message) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        config_from_dict({"moderation": section})
    assert message in str(caught.value)


# -- the real detector -------------------------------------------------------------------------
def test_nudenet_finds_nothing_in_flat_colours_and_checks_a_1024_image_in_well_under_a_second(
        ) -> None:
    pytest.importorskip("nudenet")
    detect = moderation.load_nudenet()
    moderator = Moderator(Config().moderation, detect)
    for colour in ((0, 0, 0), (255, 255, 255), (224, 172, 140)):  # the last a skin tone
        verdict = moderator.check(flat(colour))
        assert verdict == moderation.Verdict(False, seconds=verdict.seconds)
        assert verdict.seconds < 1.0
    labels = detect(png_of(Image.new("RGBA", (640, 480), (10, 200, 30, 128))))
    assert all(label in moderation.LABELS for label, _ in labels)  # RGBA and odd shapes too


def test_without_nudenet_the_check_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "nudenet", None)  # an import of it fails
    with pytest.raises(DetectorUnavailable, match=r"pip install '\.\[nsfw\]'.*AGPL-3\.0"):
        moderation.load_nudenet()


async def test_the_bot_does_not_start_when_the_check_is_on_and_nudenet_is_missing(
        config, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "nudenet", None)
    config.moderation.nsfw_check = True
    engine = Engine(config, RecordingBackend())
    with pytest.raises(DetectorUnavailable, match="nsfw_check = true needs NudeNet"):
        await engine.__aenter__()
    assert engine.backend.loads == 0  # stopped before the model is loaded


def test_doctor_names_the_missing_extra(config, monkeypatch) -> None:
    config.moderation.nsfw_check = True
    monkeypatch.setattr("bot.doctor.missing_packages", lambda: ["nudenet", "onnxruntime"])
    lines: list[str] = []
    assert run_doctor(config, None, print_fn=lines.append) == 1
    text = "\n".join(lines)
    assert "[FAIL] NSFW check: nsfw_check = true but nudenet, onnxruntime not installed" in text
    assert "fix: pip install '.[nsfw]' (NudeNet, AGPL-3.0)" in text
    monkeypatch.setattr("bot.doctor.missing_packages", lambda: [])
    lines.clear()
    run_doctor(config, None, print_fn=lines.append)
    assert any(line.startswith("[ok ] NSFW check: NudeNet installed") for line in lines)


# -- policies and verdicts ----------------------------------------------------------------------
def test_each_chat_gets_its_own_policy_and_the_console_is_never_held_back() -> None:
    cfg = config_from_dict({"moderation": {"nsfw_check": True, "policy": "spoiler",
                                           "discord_guilds": {"555": "block"},
                                           "telegram_chats": {"-1001234": "allow"}}})
    moderator = Moderator(cfg.moderation, FakeDetector())
    assert moderator.policy_for(GUILD) is Policy.BLOCK
    assert moderator.policy_for(Origin("discord", "1", extra={"guild_id": "9"})) is Policy.SPOILER
    assert moderator.policy_for(Origin("discord", "1")) is Policy.SPOILER  # a DM: the default
    assert moderator.policy_for(GROUP) is Policy.ALLOW
    assert moderator.policy_for(Origin("telegram", "42")) is Policy.SPOILER
    assert moderator.policy_for(Origin("console")) is Policy.ALLOW
    assert not moderator.needs_check(GROUP) and moderator.needs_check(GUILD)


def test_only_the_configured_labels_above_the_threshold_count() -> None:
    section = Config().moderation
    found: list[tuple[str, float]] = []
    moderator = Moderator(section, lambda png: found)
    found[:] = [("FACE_FEMALE", 0.99), ("BELLY_EXPOSED", 0.9)]
    assert not moderator.check(b"").flagged
    found[:] = [("BUTTOCKS_EXPOSED", 0.49)]
    assert not moderator.check(b"").flagged
    found[:] = [("BUTTOCKS_EXPOSED", 0.6), ("ANUS_EXPOSED", 0.7), ("FACE_MALE", 0.9)]
    verdict = moderator.check(b"")
    assert verdict.flagged and verdict.labels == ("ANUS_EXPOSED", "BUTTOCKS_EXPOSED")
    assert verdict.score == 0.7


def test_a_detector_that_fails_counts_as_flagged(caplog) -> None:
    def broken(png: bytes) -> list[tuple[str, float]]:
        raise ValueError("cannot decode")

    section = Config().moderation
    section.nsfw_check = True
    verdict = Moderator(section, broken).check(b"junk")
    assert verdict.flagged and "cannot decode" in verdict.error
    assert Moderator(section, broken).judge("j1", GUILD, [b"junk"]) == [Policy.BLOCK]


# -- in the engine -------------------------------------------------------------------------------
async def test_the_check_runs_on_its_own_thread_before_the_result_and_judges_each_image(
        config, clock, caplog) -> None:
    caplog.set_level(logging.INFO, logger="engine.moderation")
    config.moderation.nsfw_check = True
    detector = FakeDetector(6)
    backend = RecordingBackend()
    async with Engine(config, backend, clock=clock, detector=detector) as engine:
        job = await engine.submit(discord_user("1"),
                                  make_request("grid").with_changes(seed=5, count=3), GUILD)
        assert await job.wait() is JobStatus.FINISHED
        result = (await job.result())
        assert [i.policy for i in result.images] == [Policy.ALLOW, Policy.BLOCK, Policy.ALLOW]
        assert [i.seed for i in result.shown] == [5, 7]
        console = await engine.submit(discord_user("1"), make_request("local", seed=6),
                                      Origin("console"))
        assert (await console.result()).images[0].policy is Policy.ALLOW
    assert detector.checked == [5, 6, 7], "the console's image is never checked"
    loop_thread = threading.current_thread().name  # the event loop's
    gpu_threads = backend.thread_names
    assert gpu_threads and all(name.startswith("gpu-worker") for name in gpu_threads)
    assert detector.threads and not set(detector.threads) & (gpu_threads | {loop_thread})
    logged = [r.getMessage() for r in caplog.records if "NSFW check of image" in r.getMessage()]
    assert len(logged) == 3 and all(f"job {job.id}" in line for line in logged)
    assert any(f"job {job.id}: image 2/3 flagged (FEMALE_BREAST_EXPOSED (score 0.91)); not "
               "posted (blocked) in discord guild 555" in r.getMessage() for r in caplog.records)


async def test_a_result_undelivered_at_a_restart_is_checked_again(config, clock) -> None:
    config.moderation.nsfw_check = True
    config.moderation.policy = "spoiler"
    async with Engine(config, RecordingBackend(), clock=clock,
                      detector=FakeDetector(7)) as engine:
        job = await engine.submit(discord_user("1"), make_request("fox", seed=7), GUILD)
        assert (await job.result()).images[0].spoiler
        await engine.mark_undelivered(job, "channel is gone")
    detector = FakeDetector(7)
    async with Engine(config, RecordingBackend(), clock=clock, detector=detector) as again:
        [recovered] = again.recovered_jobs("discord")
        event = recovered.events_so_far[-1]
        assert isinstance(event, Finished) and event.result.images[0].policy is Policy.SPOILER
        assert detector.checked == [7]
