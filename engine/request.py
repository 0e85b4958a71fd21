"""The platform-neutral description of who asked for what, and where the answer goes."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class User:
    """A chat user. (platform, user_id) is the key; Discord and Telegram ids never collide."""

    platform: str  # "discord" | "telegram" | "console" | "cli"
    user_id: str
    # Not part of identity: a user who renames themselves is still the same user.
    display_name: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        return f"{self.platform}:{self.user_id}"


@dataclass(frozen=True)
class Source:
    """The image a variation or an upscale was made from: kept as data, so each chat can say
    it in its reader's language and the PNG's parameters in English."""

    action: str  # "variation" | "upscale"
    job_id: str
    number: int  # the image's number in its job, from 1
    detail: str = ""  # a variation's "subtle" | "strong"; an upscale's factor, "2"

    def english(self) -> str:
        """As the PNG's ``Source`` parameter says it."""
        if self.action == "variation":
            return f"variation ({self.detail}) of {self.job_id} #{self.number}"
        return f"upscale {self.detail}× of {self.job_id} #{self.number}"

    @classmethod
    def stored(cls, value: Any) -> Source | None:
        """From a journalled request: a dict; a sentence from before sources were data (its
        English, parsed once here); nothing."""
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, str) and (match := _OLD_SOURCE.fullmatch(value)):
            variation, kind, factor, job_id, number = match.groups()
            return cls("variation" if variation else "upscale", job_id, int(number),
                       kind or factor)
        return None


_OLD_SOURCE = re.compile(r"(?:(variation) \((subtle|strong)\)|upscale (\d+)×) of (\S+) #(\d+)")


@dataclass(frozen=True)
class ImageRequest:
    """A fully validated generation request (the grammar's output, the backend's input)."""

    prompt: str
    seed: int
    steps: int
    width: int
    height: int
    guidance: float
    seed_was_random: bool = False
    count: int = 1  # images in this job, from seeds seed, seed + 1, ... (``--n``)
    # Image-to-image: the PNG to start from (a file the bot keeps) and how far to move from it
    # (1.0 = text-to-image; a variation's 0.35 keeps most of the picture).
    init_image: str = ""
    strength: float = 1.0
    derived_from: Source | None = None  # the image a variation or an upscale was made from
    # An upscale: ``init_image`` enlarged to width × height and refined in tiles of this side
    # (``engine/upscale.py``); 0 for every other request.
    upscale_tile: int = 0
    style: str = ""  # a [styles.<name>] LoRA ("" = none); checked against the config at submit

    def with_changes(self, **changes: Any) -> ImageRequest:
        return dataclasses.replace(self, **changes)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.count)]

    def one(self, index: int) -> ImageRequest:
        """The request of image ``index`` alone (its own seed): what its PNG says it is."""
        return dataclasses.replace(self, seed=self.seed + index, count=1)

    @property
    def steps_run(self) -> int:
        """Denoising steps actually run per image: image-to-image runs the last ``strength``
        of the schedule (as other SD tools do), so a variation at 0.35 costs about a third."""
        if not self.init_image:
            return self.steps
        return max(1, math.ceil(self.steps * self.strength))

    def to_json(self) -> str:
        # ASCII escapes keep even a lone surrogate (possible in JSON from a chat platform) storable.
        return json.dumps(dataclasses.asdict(self), ensure_ascii=True, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageRequest:
        fields = json.loads(text)
        fields["derived_from"] = Source.stored(fields.get("derived_from"))
        return cls(**fields)


@dataclass(frozen=True)
class Origin:
    """Where a job came from and where its result should be delivered.

    ``chat_id`` is the channel/chat; ``message_id`` the user's message (Telegram replies to it);
    ``extra`` holds adapter-specific, JSON-serialisable details (e.g. a Discord guild id).
    """

    platform: str
    chat_id: str = ""
    message_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        # ASCII escapes keep even a lone surrogate (possible in JSON from a chat platform) storable.
        return json.dumps(dataclasses.asdict(self), ensure_ascii=True, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Origin:
        return cls(**json.loads(text))
