"""Fitting an image under a platform's upload limit without failing the job."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

from engine.job import ResultImage


def fit_under(png: bytes, limit_bytes: int) -> tuple[bytes, str]:
    """The PNG if it fits; else a high-quality WebP, then JPEG at falling quality.

    Returns the bytes and a file extension ("png", "webp", "jpg").
    """
    if len(png) <= limit_bytes:
        return png, "png"
    with Image.open(io.BytesIO(png)) as source:
        image = source.convert("RGB")
    for quality in (95, 90, 80):
        data = _encode(image, "WEBP", quality)
        if len(data) <= limit_bytes:
            return data, "webp"
    for quality in (85, 75, 60, 45):
        data = _encode(image, "JPEG", quality)
        if len(data) <= limit_bytes:
            return data, "jpg"
    scale = 0.7
    while True:  # last resort: smaller pixels
        size = (max(16, int(image.width * scale)), max(16, int(image.height * scale)))
        small = image.resize(size)
        data = _encode(small, "JPEG", 75)
        if len(data) <= limit_bytes or small.width <= 16:
            return data, "jpg"
        scale *= 0.7


def fit_all(job_id: str, images: Sequence[ResultImage],
            limit_bytes: int) -> list[tuple[bytes, str]]:
    """A job's images for one upload whose whole size counts against ``limit_bytes``: each
    under an equal share, named ``<job id>-<seed>.<ext>``."""
    share = limit_bytes // len(images)
    fitted = []
    for image in images:
        data, ext = fit_under(image.png, share)
        fitted.append((data, f"{job_id}-{image.seed}.{ext}"))
    return fitted


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()
