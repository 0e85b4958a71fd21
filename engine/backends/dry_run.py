"""A backend with no GPU: a deterministic placeholder image marked "DRY RUN".

It emits the same step events as the real one, so an admin can try the bot's commands and
permissions before downloading 30 GB of models, and tests can drive the whole bot on a CPU.
"""

from __future__ import annotations

import random
import threading

from PIL import Image, ImageDraw, ImageFont

from engine.backends.base import StepCallback, load_init_image
from engine.request import ImageRequest
from engine.upscale import upscale


class DryRunBackend:
    model_name = "dry-run placeholder"

    def __init__(self, step_seconds: float = 0.0) -> None:
        self.step_seconds = step_seconds
        self.loaded = False
        self._sleep = threading.Event()  # never set: an interruptible sleep

    def load(self) -> None:
        self.loaded = True

    def generate(self, request: ImageRequest, on_step: StepCallback) -> list[Image.Image]:
        if request.upscale_tile:
            return [upscale(request, self._refine, on_step)]
        steps = request.steps_run
        for step in range(1, steps * request.count + 1):
            if self.step_seconds:
                self._sleep.wait(self.step_seconds)
            on_step(step, steps * request.count)
        images = [placeholder_image(request.one(i)) for i in range(request.count)]
        if request.init_image:  # image-to-image: as much of the start as the strength keeps
            start = load_init_image(request)
            images = [Image.blend(start, image, request.strength) for image in images]
        return images

    def _refine(self, start: Image.Image, request: ImageRequest,
                on_step: StepCallback) -> Image.Image:
        """One tile of an upscale: its steps, then the tile with a touch of the placeholder
        over it (so a test can see every tile was refined)."""
        steps = request.steps_run
        for step in range(1, steps + 1):
            if self.step_seconds:
                self._sleep.wait(self.step_seconds)
            on_step(step, steps)
        return Image.blend(start, placeholder_image(request), request.strength * 0.2)

    def close(self) -> None:
        self.loaded = False

    def reduce_memory(self) -> bool:
        return False

    def memory_info(self) -> dict[str, float]:
        return {}

    def model_state(self) -> None:
        return None


def placeholder_image(request: ImageRequest) -> Image.Image:
    """A two-colour gradient chosen by the seed, with "DRY RUN" and the seed written on it."""
    rng = random.Random(request.seed)
    a = [rng.randrange(40, 216) for _ in range(3)]
    b = [rng.randrange(40, 216) for _ in range(3)]
    w, h = request.width, request.height
    # Build a small gradient and scale it up: fast even at 1024² on one core.
    small = Image.new("RGB", (64, 64))
    small.putdata([
        tuple(int(a[c] + (b[c] - a[c]) * (x + y) / 126) for c in range(3))
        for y in range(64) for x in range(64)
    ])
    image = small.resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    size = max(16, min(w, h) // 8)
    font = ImageFont.load_default(size=size)
    lines = ["DRY RUN", f"seed {request.seed}", f"{w}x{h}, {request.steps} steps"]
    if request.style:  # the LoRA a real backend would apply
        lines.append(f"style {request.style}")
    y = h // 2 - size * 2
    for i, line in enumerate(lines):
        line_size = size if i == 0 else size // 2
        line_font = font if i == 0 else ImageFont.load_default(size=line_size)
        box = draw.textbbox((0, 0), line, font=line_font)
        draw.text(((w - (box[2] - box[0])) // 2, y), line, fill=(255, 255, 255), font=line_font,
                  stroke_width=max(1, line_size // 12), stroke_fill=(0, 0, 0))
        y += int(line_size * 1.4)
    return image
