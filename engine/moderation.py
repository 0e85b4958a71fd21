"""The opt-in image-level NSFW check (``[moderation]``): a detector run on the CPU on each
finished image before it is posted, and the policy of the chat it goes to.

    moderator = Moderator(config.moderation)      # no detector is loaded yet
    moderator.load()                              # start-up, on a thread: nudenet's ONNX model
    policy = moderator.judge(job_id, origin, png) # a thread beside the GPU, never the loop

An image the detector finds nothing in is posted as usual (``Policy.ALLOW``); a flagged one gets
its chat's policy: ``spoiler`` (posted hidden behind the platform's spoiler) or ``block`` (not
posted; the user is told). The detector is NudeNet (AGPL-3.0, an optional extra:
``pip install '.[nsfw]'``), imported only when the check is on. Pure Python: no chat library.
"""

from __future__ import annotations

import enum
import importlib.util
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.request import Origin

if TYPE_CHECKING:  # pragma: no cover
    from engine.config import ModerationSection

log = logging.getLogger(__name__)


class Policy(str, enum.Enum):
    ALLOW = "allow"  # post as usual
    SPOILER = "spoiler"  # post behind the platform's spoiler
    BLOCK = "block"  # do not post; tell the user


POLICIES = tuple(p.value for p in Policy)
# Every class NudeNet 3.4's detector reports; [moderation] labels picks the ones that count.
LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)
DEFAULT_LABELS = ["FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
                  "BUTTOCKS_EXPOSED", "ANUS_EXPOSED"]
INSTALL_HINT = ("pip install '.[nsfw]' (NudeNet, AGPL-3.0), or set [moderation] "
                "nsfw_check = false")

# The detector's boundary: a PNG's bytes in, (label, score) pairs out. Tests pass their own.
Detector = Callable[[bytes], Sequence[tuple[str, float]]]


class DetectorUnavailable(RuntimeError):
    """``nsfw_check = true`` but the detector cannot be loaded: the bot does not start (posting
    unchecked images where an admin asked for the check would be worse than not running)."""


@dataclass(frozen=True)
class Verdict:
    """What the detector found in one image, counting only ``[moderation] labels``."""

    flagged: bool
    labels: tuple[str, ...] = ()
    score: float = 0.0  # the highest counted score
    seconds: float = 0.0  # wall time of the check (decode + model)
    error: str = ""  # the detector failed: counted as flagged (fail closed)

    def describe(self) -> str:
        if self.error:
            return f"check failed ({self.error}); treated as flagged"
        if not self.flagged:
            return "nothing found"
        return f"{', '.join(self.labels)} (score {self.score:.2f})"


def missing_packages() -> list[str]:
    """The detector's packages that are not installed (``doctor``; nothing is imported)."""
    return [name for name in ("nudenet", "onnxruntime", "cv2")
            if importlib.util.find_spec(name) is None]


def load_nudenet() -> Detector:
    """NudeNet's detector (its 320n ONNX model ships in the wheel) on onnxruntime's CPU."""
    try:
        import numpy as np
        from nudenet import NudeDetector
        from PIL import Image
    except ImportError as exc:
        raise DetectorUnavailable(f"[moderation] nsfw_check = true needs NudeNet, which is not "
                                  f"installed ({exc.name}): {INSTALL_HINT}") from None
    try:
        model = NudeDetector()
    except Exception as exc:  # a broken onnxruntime install, a damaged model file
        raise DetectorUnavailable(f"NudeNet's model could not be loaded ({exc}): reinstall "
                                  f"with {INSTALL_HINT}") from None

    def detect(png: bytes) -> list[tuple[str, float]]:
        with Image.open(io.BytesIO(png)) as image:
            # RGBA: nudenet's own reader converts from RGBA (it fails on 3-channel input)
            pixels = np.asarray(image.convert("RGBA"))
        return [(d["class"], float(d["score"])) for d in model.detect(pixels)]

    return detect


class Moderator:
    """The check and the policies of ``[moderation]``. ``detector``: tests inject their own;
    otherwise NudeNet is loaded by ``load`` when the check is on."""

    def __init__(self, section: ModerationSection, detector: Detector | None = None) -> None:
        self.section = section
        self._detector = detector
        self._labels = frozenset(section.labels)

    @property
    def enabled(self) -> bool:
        return self.section.nsfw_check

    def load(self) -> None:
        """Load the detector now (blocking: run it on a thread), so a missing package stops
        the start-up with a sentence instead of failing the first image."""
        if self.enabled and self._detector is None:
            started = time.monotonic()
            self._detector = load_nudenet()
            log.info("NSFW check on: NudeNet loaded in %.2f s", time.monotonic() - started)

    def policy_for(self, origin: Origin) -> Policy:
        """The policy of the chat ``origin`` posts to: its override, else the default. The
        console and the command line are the owner's own machine: never held back."""
        s = self.section
        if origin.platform == "discord":
            override = s.discord_guilds.get(str(origin.extra.get("guild_id") or ""))
        elif origin.platform == "telegram":
            override = s.telegram_chats.get(origin.chat_id)
        else:
            return Policy.ALLOW
        return Policy(override or s.policy)

    def needs_check(self, origin: Origin) -> bool:
        return self.enabled and self.policy_for(origin) is not Policy.ALLOW

    def check(self, png: bytes) -> Verdict:
        """Run the detector on one PNG (blocking, CPU). A failure is a flagged verdict."""
        if self._detector is None:
            raise DetectorUnavailable(f"the NSFW check is not loaded: {INSTALL_HINT}")
        started = time.perf_counter()
        try:
            found = self._detector(png)
        except Exception as exc:
            log.exception("the NSFW check failed on an image")
            return Verdict(True, seconds=time.perf_counter() - started,
                           error=f"{type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - started
        hits = [(label, score) for label, score in found
                if label in self._labels and score >= self.section.threshold]
        if not hits:
            return Verdict(False, seconds=seconds)
        labels = tuple(sorted({label for label, _ in hits}))
        return Verdict(True, labels, max(score for _, score in hits), seconds)

    def judge(self, job_id: str, origin: Origin, pngs: Sequence[bytes]) -> list[Policy]:
        """What to do with each image of a job in its chat (blocking: run it on a thread).
        Each check's time is logged; a flagged image's line names the job for the admin."""
        if not self.needs_check(origin):
            return [Policy.ALLOW] * len(pngs)
        policy = self.policy_for(origin)
        decided = []
        for index, png in enumerate(pngs, start=1):
            verdict = self.check(png)
            log.info("job %s: NSFW check of image %d/%d took %.3f s: %s", job_id, index,
                     len(pngs), verdict.seconds, verdict.describe())
            if verdict.flagged:
                log.warning("job %s: image %d/%d flagged (%s); %s in %s", job_id, index,
                            len(pngs), verdict.describe(), _done(policy), where(origin))
            decided.append(policy if verdict.flagged else Policy.ALLOW)
        return decided


def delivered_blocked(where: str) -> str:
    """The journal's ``delivered_to`` of a result the check held back entirely: delivered (the
    user was told, at ``where``), never retried as undelivered."""
    return f"{BLOCKED_PREFIX}{where}"


BLOCKED_PREFIX = "blocked:"


def _done(policy: Policy) -> str:
    return "not posted (blocked)" if policy is Policy.BLOCK else "posted as a spoiler"


def where(origin: Origin) -> str:
    """The chat for the admin's log line."""
    if origin.platform == "discord":
        return f"discord guild {origin.extra.get('guild_id') or '(DM)'} channel {origin.chat_id}"
    return f"{origin.platform} chat {origin.chat_id}"
