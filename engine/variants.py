"""New requests made from a finished one, as the buttons under an image ask for them.

Both chat adapters use these, so "Re-roll", "Same seed, more steps" and the variations mean the
same everywhere. The result is checked against the current limits again: they may have changed
since.
"""

from __future__ import annotations

import random
from pathlib import Path

from engine import result_files
from engine.config import LimitsSection
from engine.errors import N_, InvalidCommand
from engine.grammar import ParsedCommand
from engine.request import ImageRequest, Source
from engine.store import JobRecord
from engine.upscale import FACTOR, tile_side

MORE_STEPS = 10  # "Same seed, more steps" adds this many (up to limits.steps_max)


def reroll(request: ImageRequest, limits: LimitsSection,
           rng: random.Random | None = None) -> ImageRequest:
    """The same request with a new random seed, different from the old one where the range
    allows it."""
    rng = rng or random.SystemRandom()
    seed = request.seed
    for _ in range(10):
        # room for the seeds after it (a job of --n 4 uses seed .. seed + 3)
        seed = rng.randint(limits.seed_min, max(limits.seed_min,
                                                limits.seed_max - (request.count - 1)))
        if seed != request.seed:
            break
    return _checked(request, limits, seed, request.steps).with_changes(seed_was_random=True)


def more_steps(request: ImageRequest, limits: LimitsSection,
               extra: int = MORE_STEPS) -> ImageRequest:
    """The same seed with ``extra`` more steps, up to the most allowed."""
    steps = min(request.steps + extra, limits.steps_max)
    if steps <= request.steps:
        raise InvalidCommand(N_("This image already uses the most steps allowed ({most})."),
                             most=limits.steps_max)
    return _checked(request, limits, request.seed, steps)


def _checked(request: ImageRequest, limits: LimitsSection, seed: int,
             steps: int) -> ImageRequest:
    if request.upscale_tile:  # larger than any request the grammar allows
        raise InvalidCommand(N_("An upscale is made from its original image; please use the "
                                "buttons under that one."))
    parsed = ParsedCommand(prompt=request.prompt, seed=seed, steps=steps, width=request.width,
                           height=request.height, guidance=request.guidance,
                           count=min(request.count, limits.images_max))
    # what the grammar does not spell (a variation's start and strength) carries over
    return parsed.to_request(limits).with_changes(init_image=request.init_image,
                                                  strength=request.strength,
                                                  derived_from=request.derived_from)


VARIATIONS = ("subtle", "strong")


def image_of(record_path: str | None, request: ImageRequest, index: int) -> str:
    """The file of image ``index`` (0-based) of a finished job, or ``InvalidCommand``."""
    if not 0 <= index < request.count:
        message = N_("That job has {count} image; pick 1 to {count}.") if request.count == 1 \
            else N_("That job has {count} images; pick 1 to {count}.")
        raise InvalidCommand(message, count=request.count)
    if not record_path:
        raise InvalidCommand(N_("That job has no image to start from."))
    path = result_files.paths(record_path, request)[index]
    if not Path(path).exists():
        raise InvalidCommand(N_("That image is no longer kept by the bot, so it cannot be "
                                "varied."))
    return str(path)


def kept_image(record: JobRecord, index: int) -> Path | None:
    """The file of image ``index`` (0-based) of a finished job; None if there is no such image
    or the bot no longer keeps it (the buttons' "image gone" answer)."""
    if record.status != "finished":
        return None
    try:
        return Path(image_of(record.result_path, record.request, index))
    except InvalidCommand:
        return None


def vary(request: ImageRequest, job_id: str, record_path: str | None, index: int, kind: str,
         limits: LimitsSection, rng: random.Random | None = None) -> ImageRequest:
    """Image-to-image from image ``index`` of a finished job: same prompt and size, a new
    seed, one image, at the configured subtle or strong strength."""
    if kind not in VARIATIONS:
        raise InvalidCommand(N_("A variation is either subtle or strong."))
    if request.upscale_tile:
        raise InvalidCommand(N_("Variations are made from the original image, not its upscale; "
                                "please use the buttons under that one."))
    start = image_of(record_path, request, index)
    strength = limits.vary_subtle_strength if kind == "subtle" else limits.vary_strong_strength
    single = request.one(index).with_changes(init_image="", strength=1.0, derived_from=None)
    return reroll(single, limits, rng).with_changes(
        init_image=start, strength=strength,
        derived_from=Source("variation", job_id, index + 1, kind))


def alone(request: ImageRequest, index: int) -> ImageRequest:
    """Image ``index`` of a job as a request of its own (what its PNG says it is)."""
    return request.one(index)


def upscale(request: ImageRequest, job_id: str, record_path: str | None, index: int,
            limits: LimitsSection) -> ImageRequest:
    """Image ``index`` of a finished job at twice its size: the enlarged image refined in tiles
    (``engine/upscale.py``) with the same prompt and seed at ``limits.upscale_strength``. It
    may be larger than ``limits.max_pixels``: no tile is."""
    start = image_of(record_path, request, index)
    one = request.one(index)
    if one.upscale_tile:
        raise InvalidCommand(N_("This image is an upscale already."))
    return one.with_changes(
        init_image=start, strength=limits.upscale_strength, width=one.width * FACTOR,
        height=one.height * FACTOR, upscale_tile=tile_side(limits.max_pixels,
                                                           limits.size_multiple),
        seed_was_random=False, derived_from=Source("upscale", job_id, index + 1, str(FACTOR)))


def from_button(action: str, record: JobRecord, index: int, kind: str, limits: LimitsSection,
                rng: random.Random | None = None) -> ImageRequest:
    """The new job a button under a finished job asks for, the same on every platform:
    "reroll", "more" (same seed, more steps), "v" (a ``kind`` variation of image ``index``,
    0-based) or "up" (image ``index`` upscaled)."""
    if action == "reroll":
        return reroll(record.request, limits, rng)
    if action == "more":
        return more_steps(record.request, limits)
    if action == "up":
        return upscale(record.request, record.job_id, record.result_path, index, limits)
    if action == "v":
        return vary(record.request, record.job_id, record.result_path, index, kind, limits, rng)
    raise ValueError(f"no new job for the button {action!r}")
