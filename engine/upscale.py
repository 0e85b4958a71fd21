"""Upscale 2×: the image enlarged, then refined tile by tile with image-to-image at low strength.

A 2048² image is four times the pixels the planner budgets for (``limits.max_pixels``), so it is
never sampled whole: the Lanczos-enlarged image is cut into overlapping tiles of at most
``max_pixels`` each, every tile is refined by the backend's own image-to-image (same prompt,
``limits.upscale_strength``), and the tiles are blended back with feathered edges so no seam
shows. The GPU only ever sees a tile, so an upscale runs wherever a 1024² image does. Backends
call ``upscale`` with their single-image ``refine``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageFilter

from engine.backends.base import StepCallback, load_init_image, per_image
from engine.request import ImageRequest

FACTOR = 2
OVERLAP = 128  # pixels two neighbouring tiles share: the width of the blend

Box = tuple[int, int, int, int]  # left, top, right, bottom
Refine = Callable[[Image.Image, ImageRequest, StepCallback], Image.Image]


def tile_side(max_pixels: int, multiple: int) -> int:
    """The largest square tile side within ``max_pixels``, a multiple of ``multiple``."""
    return max(multiple, int(math.isqrt(max_pixels)) // multiple * multiple)


def tiles(width: int, height: int, side: int, overlap: int = OVERLAP) -> list[Box]:
    """Boxes of at most ``side`` × ``side`` covering the image, neighbours sharing at least
    ``overlap`` pixels; the last row and column end flush with the image."""
    def starts(length: int) -> list[int]:
        if length <= side:
            return [0]
        count = math.ceil((length - overlap) / (side - overlap))
        step = (length - side) / (count - 1)
        return [round(i * step) for i in range(count)]

    return [(x, y, min(x + side, width), min(y + side, height))
            for y in starts(height) for x in starts(width)]


def feather(size: tuple[int, int], box: Box, image_size: tuple[int, int],
            overlap: int = OVERLAP) -> Image.Image:
    """The tile's blend mask: opaque inside, fading to clear over ``overlap`` / 2 at each edge
    it shares with a neighbour (an image edge stays opaque)."""
    width, height = size
    margin = overlap // 2
    left, top, right, bottom = (
        margin if box[0] > 0 else 0, margin if box[1] > 0 else 0,
        margin if box[2] < image_size[0] else 0, margin if box[3] < image_size[1] else 0)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(
        (left, top, width - 1 - right, height - 1 - bottom), fill=255)
    return mask.filter(ImageFilter.BoxBlur(margin / 2)) if margin else mask


def upscale(request: ImageRequest, refine: Refine, on_step: StepCallback) -> Image.Image:
    """``request.init_image`` at ``request.width`` × ``request.height`` (the enlarged size),
    refined tile by tile (``request.upscale_tile``); progress counts every tile's steps."""
    canvas = load_init_image(request)  # Lanczos to the target size
    boxes = tiles(request.width, request.height, request.upscale_tile)
    for index, box in enumerate(boxes):
        piece = canvas.crop(box)
        part = request.with_changes(width=box[2] - box[0], height=box[3] - box[1],
                                    upscale_tile=0)
        refined = refine(piece, part, per_image(on_step, index, len(boxes)))
        canvas.paste(refined, box[:2], feather(refined.size, box, canvas.size))
    return canvas
