"""Pictures users send to start from (image-to-image): checked, normalised and kept on disk.

    check_announced(attachment_size, limits)       # before the download, where the platform
                                                   # says how big the file is
    data = read_file(path, limits)                 # or a local file (the console), blocking
    request = request_for(parsed, data, limits, folder, rng)   # blocking (Pillow): a thread
    with discarded_if_refused(request.init_image):
        job = await engine.submit(user, request, origin)

Only PNG, JPEG and WebP files up to ``limits.input_max_bytes`` are opened, and none whose header
claims more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb: a small file
that would unpack into gigabytes). The picture is turned upright (EXIF orientation), transparent
parts become white, and it is saved as an RGB PNG at the job's size in ``<output_dir>/inputs``,
which the journalled request names, so a restart still runs the job. The job's size follows the
picture's shape unless ``--ar``/``--size`` was given (then the picture is cropped to that shape,
from its centre, rather than stretched). Every refusal is an ``InvalidCommand`` with one sentence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageOps

from engine.config import LimitsSection
from engine.durable import write_durably
from engine.errors import N_, InvalidCommand
from engine.grammar import MAX_ASPECT, ParsedCommand
from engine.request import ImageRequest

log = logging.getLogger(__name__)

INPUTS_FOLDER = "inputs"  # under engine.output_dir
# Pillow's format name for each accepted file signature (checked before Pillow opens anything).
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))


def inputs_folder(output_dir: str | Path) -> Path:
    return Path(output_dir) / INPUTS_FOLDER


def read_file(path: str, limits: LimitsSection) -> bytes:
    """A picture from a file on this machine (the console's ``--image FILE``), its size checked
    before it is read; blocking (a thread)."""
    try:
        file = Path(path).expanduser()
        if not file.is_file():
            raise InvalidCommand(N_("There is no file at {path}; please give the path of a PNG, "
                                    "JPEG or WebP image."), path=path)
        check_announced(file.stat().st_size, limits)
        with file.open("rb") as f:
            return f.read(limits.input_max_bytes + 1)  # decode() refuses a file grown since
    except (OSError, RuntimeError) as e:  # no permission, ~nosuchuser, a device or FIFO
        raise InvalidCommand(N_("I could not read {path}; please check the path and that the "
                                "bot may read it."), path=path) from e


def check_announced(size: int | None, limits: LimitsSection) -> None:
    """Refuse a file the platform says is too big, before anything is downloaded."""
    if size is not None and size > limits.input_max_bytes:
        raise _too_big(size, limits)


def unavailable() -> InvalidCommand:
    """The chat platform would not hand over the file."""
    return InvalidCommand(N_("I could not download that image; please send it again."))


def request_for(parsed: ParsedCommand, data: bytes, limits: LimitsSection, folder: Path,
                rng: random.Random | None = None) -> ImageRequest:
    """The image-to-image request for ``parsed`` starting from the picture ``data``, whose
    normalised PNG is written to ``folder`` (nothing is written when anything is refused)."""
    picture = decode(data, limits)
    if parsed.width is not None and parsed.height is not None:
        size = (parsed.width, parsed.height)  # --ar/--size win: the picture is cropped to it
    else:
        size = job_size(*picture.size, limits)
    strength = limits.strength_default if parsed.strength is None else parsed.strength
    # the grammar checks the rest (prompt, seed and --n) before anything is written
    request = dataclasses.replace(parsed, strength=None, width=size[0],
                                  height=size[1]).to_request(limits, rng)
    path = save(ImageOps.fit(picture, size, Image.Resampling.LANCZOS), folder)
    return request.with_changes(init_image=str(path), strength=strength)


def decode(data: bytes, limits: LimitsSection) -> Image.Image:
    """The picture in ``data`` as an upright RGB image, transparency flattened onto white."""
    if len(data) > limits.input_max_bytes:
        raise _too_big(len(data), limits)
    kind = _format_of(data)
    if kind is None:
        raise InvalidCommand(N_("That file is not a PNG, JPEG or WebP image; please send one "
                                "of those."))
    most = Image.MAX_IMAGE_PIXELS  # read now: tests and admins may change it
    try:
        with Image.open(io.BytesIO(data), formats=[kind]) as image:
            if most is not None and image.width * image.height > most:
                raise Image.DecompressionBombError  # Pillow only warns between 1× and 2×
            image.load()
            return _flattened(_upright(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidCommand(N_("That image has too many pixels to open safely (at most "
                                "{most}); please send a smaller one."),
                             most=f"{most or 0:,}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError):  # Pillow's parse errors
        raise InvalidCommand(N_("That image could not be read (it may be damaged or cut "
                                "short); please send it again or try another.")) from None


def job_size(width: int, height: int, limits: LimitsSection) -> tuple[int, int]:
    """The job's size for a ``width`` × ``height`` picture: the same shape, shrunk to at most
    ``max_pixels`` (grown where a side is under ``min_side``), sides multiples of
    ``size_multiple``."""
    if not 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
        raise InvalidCommand(
            N_("That image is {width}×{height} pixels, a narrower shape than 1:{most} or "
               "{most}:1 allows; please crop it, or give --ar or --size to use part of it."),
            width=width, height=height, most=MAX_ASPECT)
    step = limits.size_multiple
    low = -(-limits.min_side // step) * step  # the smallest allowed side
    scale = min(1.0, math.sqrt(limits.max_pixels / (width * height)))
    scale = max(scale, low / min(width, height))
    size = [max(round(side * scale / step) * step, low) for side in (width, height)]
    if size[0] * size[1] > limits.max_pixels:  # rounding up went over: round down instead
        size = [max(int(side * scale) // step * step, low) for side in (width, height)]
    if size[0] * size[1] > limits.max_pixels:
        raise InvalidCommand(N_("No allowed size has the shape of that {width}×{height} image; "
                                "please give --ar or --size."), width=width, height=height)
    return size[0], size[1]


def save(picture: Image.Image, folder: Path) -> Path:
    """Write ``picture`` as a new PNG in ``folder`` (power-cut safe: the journal will name it)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    picture.save(out, format="PNG", compress_level=3)  # a start image: speed over size
    path = folder / f"{uuid.uuid4().hex}.png"
    write_durably(path, out.getvalue())
    return path


@contextlib.contextmanager
def discarded_if_refused(path: str) -> Iterator[None]:
    """Delete the saved picture ``path`` ("" = none) when the job it was made for is not
    accepted (a rate limit, a full queue, a command sent again): no journal row names it."""
    try:
        yield
    except Exception:
        discard(path)
        raise


def discard(path: str) -> None:
    if path:
        Path(path).unlink(missing_ok=True)


def _format_of(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for signature, kind in _SIGNATURES if data.startswith(signature)), None)


def _upright(image: Image.Image) -> Image.Image:
    """The picture as it is meant to be seen (phones store it sideways with an EXIF tag)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block: the picture itself is still good
        log.info("ignoring an unreadable EXIF orientation", exc_info=True)
        return image


def _flattened(image: Image.Image) -> Image.Image:
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _too_big(size: int, limits: LimitsSection) -> InvalidCommand:
    return InvalidCommand(N_("That image is {size}; please send one of at most {most}."),
                          size=_megabytes(size), most=_megabytes(limits.input_max_bytes))


def _megabytes(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MB" if size >= 100 * 1024 else f"{size / 1024:.0f} KB"
