"""engine/input_image.py: the pictures users send to start from, checked and normalised."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from engine import input_image
from engine.config import Config, LimitsSection
from engine.errors import InvalidCommand
from engine.grammar import parse_command
from engine.request import ImageRequest, User
from tests.conftest import ORIGIN, FakeClock

LIMITS = LimitsSection()


def encoded(image: Image.Image, kind: str = "PNG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=kind, **options)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header says ``width`` × ``height``: a decompression bomb's calling card."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def sideways_jpeg() -> bytes:
    """40×20 as stored, left half red: EXIF orientation 6 says "turn 90° clockwise to view"."""
    image = Image.new("RGB", (40, 20), "blue")
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", exif=exif, quality=95)


# -- decoding ------------------------------------------------------------------------------
def test_exif_orientation_is_applied() -> None:
    upright = input_image.decode(sideways_jpeg(), LIMITS)
    assert upright.size == (20, 40) and upright.mode == "RGB"
    red, blue = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert red[0] > 200 and red[2] < 60, red  # the stored left half is now on top
    assert blue[2] > 200 and blue[0] < 60, blue


def test_alpha_is_flattened_onto_white() -> None:
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((1, 1), (255, 0, 0, 128))  # half-transparent red
    flat = input_image.decode(encoded(image), LIMITS)
    assert flat.mode == "RGB"
    assert flat.getpixel((0, 0)) == (255, 255, 255)
    assert flat.getpixel((1, 1)) == (255, 127, 127)


def test_a_palette_image_with_a_transparent_colour_is_flattened_too() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    flat = input_image.decode(encoded(image, transparency=0), LIMITS)
    assert flat.getpixel((0, 0)) == (0, 255, 0) and flat.getpixel((3, 3)) == (255, 255, 255)


def test_webp_and_jpeg_and_png_are_taken() -> None:
    image = Image.new("RGB", (16, 16), "green")
    for kind in ("PNG", "JPEG", "WEBP"):
        assert input_image.decode(encoded(image, kind), LIMITS).size == (16, 16)


@pytest.mark.parametrize(("data", "said"), [
    (b"GIF89a" + b"\0" * 100, "not a PNG, JPEG or WebP"),
    (b"hello, this is text", "not a PNG, JPEG or WebP"),
    (b"", "not a PNG, JPEG or WebP"),
    (encoded(Image.new("RGB", (64, 64), "red"))[:80], "could not be read"),  # cut short
    (b"\xff\xd8\xff" + b"\0" * 50, "could not be read"),  # a JPEG signature, then nothing
    (png_claiming(100_000, 100_000), "too many pixels"),
])
def test_bad_files_are_refused_with_one_sentence(data: bytes, said: str) -> None:
    with pytest.raises(InvalidCommand) as refused:
        input_image.decode(data, LIMITS)
    assert said in str(refused.value) and str(refused.value).endswith(".")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_just_over_pillows_pixel_limit_is_refused_not_only_warned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warning range: 1000 to 2000 pixels
    small_but_many = encoded(Image.new("L", (40, 30)))  # 1,200 pixels
    with pytest.raises(InvalidCommand, match="too many pixels"):
        input_image.decode(small_but_many, LIMITS)


def test_the_byte_cap_is_checked_before_and_after_the_download() -> None:
    limits = LimitsSection(input_max_bytes=1000)
    with pytest.raises(InvalidCommand, match="at most 1 KB"):
        input_image.check_announced(5 * 1024 * 1024, limits)
    input_image.check_announced(None, limits)  # size unknown: checked once the bytes are here
    input_image.check_announced(1000, limits)
    with pytest.raises(InvalidCommand, match=r"That image is 5\.0 MB"):
        input_image.decode(b"\0" * (5 * 1024 * 1024), limits)


# -- the job's size ------------------------------------------------------------------------
@pytest.mark.parametrize(("picture", "size"), [
    ((1280, 960), (1184, 880)),  # a Telegram photo: shrunk under max_pixels
    ((4000, 3000), (1184, 880)),
    ((512, 512), (512, 512)),  # small enough: its own size
    ((300, 200), (384, 256)),  # grown so the short side is min_side
    ((1920, 1080), (1360, 768)),
    ((1080, 1920), (768, 1360)),
    ((1000, 250), (1024, 256)),  # 4:1 is allowed
])
def test_the_size_follows_the_picture(picture: tuple[int, int], size: tuple[int, int]) -> None:
    assert input_image.job_size(*picture, LIMITS) == size


def test_sizes_are_allowed_for_any_shape_up_to_4_to_1() -> None:
    for width in range(100, 5000, 97):
        for height in (width // 4 + 1, width // 2, width, width * 3):
            got = input_image.job_size(width, height, LIMITS)
            assert got[0] * got[1] <= LIMITS.max_pixels and min(got) >= LIMITS.min_side
            assert got[0] % 16 == 0 and got[1] % 16 == 0
            assert abs(got[0] / got[1] - width / height) < 0.12 * width / height


def test_a_sliver_is_refused_unless_a_shape_is_given(tmp_path: Path) -> None:
    with pytest.raises(InvalidCommand, match="1:4 or 4:1"):
        input_image.job_size(5000, 400, LIMITS)
    data = encoded(Image.new("RGB", (500, 40), "red"))
    parsed = parse_command("a fox --ar 1:1", LIMITS)
    request = input_image.request_for(parsed, data, LIMITS, tmp_path)
    assert (request.width, request.height) == (1024, 1024)


# -- the request ---------------------------------------------------------------------------
def test_request_starts_from_the_saved_picture_at_the_default_strength(tmp_path: Path) -> None:
    data = encoded(Image.new("RGB", (1600, 900), "red"), "JPEG")
    parsed = parse_command("a red fox --seed 7 --steps 10", LIMITS)
    request = input_image.request_for(parsed, data, LIMITS, tmp_path / "inputs")
    assert (request.seed, request.steps, request.strength) == (7, 10, 0.6)
    assert (request.width, request.height) == (1360, 768)
    assert request.steps_run == 6
    saved = Path(request.init_image)
    assert saved.parent == tmp_path / "inputs" and saved.suffix == ".png"
    with Image.open(saved) as start:
        assert (start.format, start.mode, start.size) == ("PNG", "RGB", (1360, 768))


def test_a_given_strength_and_size_win(tmp_path: Path) -> None:
    image = Image.new("RGB", (400, 200), "blue")
    image.paste((255, 0, 0), (150, 0, 250, 200))  # a red band in the middle
    parsed = parse_command("a fox --strength 0.3 --size 512x512", LIMITS)
    request = input_image.request_for(parsed, encoded(image), LIMITS, tmp_path)
    assert (request.strength, request.width, request.height) == (0.3, 512, 512)
    with Image.open(request.init_image) as start:  # cropped from the centre, not squeezed
        assert start.getpixel((256, 256))[0] > 200 and start.getpixel((5, 256))[2] > 200


def test_nothing_is_written_for_a_refused_picture_or_command(tmp_path: Path) -> None:
    with pytest.raises(InvalidCommand):
        input_image.request_for(parse_command("a fox", LIMITS), b"text", LIMITS, tmp_path)
    data = encoded(Image.new("RGB", (64, 64)))
    with pytest.raises(InvalidCommand, match="seed"):
        input_image.request_for(parse_command("a fox", LIMITS).__class__(
            prompt="a fox", seed=-5), data, LIMITS, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_submit_discards_the_saved_picture(tmp_path: Path) -> None:
    data = encoded(Image.new("RGB", (64, 64)))
    request = input_image.request_for(parse_command("a fox", LIMITS), data, LIMITS, tmp_path)
    with pytest.raises(RuntimeError), input_image.discarded_if_refused(request.init_image):
        raise RuntimeError("rate limited")
    assert not Path(request.init_image).exists()
    with input_image.discarded_if_refused(""):  # no picture: nothing to do
        pass


# -- the grammar ---------------------------------------------------------------------------
def test_strength_without_a_picture_is_a_polite_error() -> None:
    parsed = parse_command("a fox --strength 0.5", LIMITS)
    assert parsed.strength == 0.5
    with pytest.raises(InvalidCommand, match="only works with an image"):
        parsed.to_request(LIMITS)


@pytest.mark.parametrize("value", ["0", "1.5", "abc", "0.01"])
def test_strength_out_of_range_names_the_range(value: str) -> None:
    with pytest.raises(InvalidCommand, match="0.05 to 1"):
        parse_command(f"a fox --strength {value}", LIMITS)


def test_strength_as_a_typed_option_and_in_help() -> None:
    merged, overridden = parse_command("a fox", LIMITS).merged_with(LIMITS, strength=0.8)
    assert merged.strength == 0.8 and overridden == []
    with pytest.raises(InvalidCommand, match="strength"):
        parse_command("a fox", LIMITS).merged_with(LIMITS, strength=2.0)
    from engine.grammar import usage
    assert "--strength X" in usage(LIMITS) and "default 0.6" in usage(LIMITS)
    with pytest.raises(InvalidCommand, match="--n, --strength and --style"):
        parse_command("a fox --zzzzzzz 1", LIMITS)


# -- retention -----------------------------------------------------------------------------
async def test_retention_deletes_the_pictures_of_pruned_jobs_and_old_orphans(
        engine_factory: Any, config: Config, clock: FakeClock) -> None:
    engine = await engine_factory(config)
    folder = input_image.inputs_folder(config.engine.output_dir)
    data = encoded(Image.new("RGB", (64, 64)))
    user = User("telegram", "5", "Ada")

    def start(prompt: str) -> ImageRequest:
        parsed = parse_command(f"{prompt} --steps 1", config.limits)
        return input_image.request_for(parsed, data, config.limits, folder)

    old = start("old")
    done = await engine.submit(user, old, ORIGIN)
    await done.wait()
    await engine.mark_delivered(done, "telegram:5/1")
    engine.pause()
    waiting = start("waiting")
    await engine.submit(user, waiting, ORIGIN)
    orphan = input_image.save(Image.new("RGB", (8, 8)), folder)  # e.g. a crash before submit
    fresh = input_image.save(Image.new("RGB", (8, 8)), folder)
    clock.advance(31 * 86400)
    for path in (old.init_image, waiting.init_image, orphan):  # file ages are wall-clock time
        os.utime(path, (time.time() - 31 * 86400,) * 2)

    assert await engine.prune() == 1
    assert not Path(old.init_image).exists() and not orphan.exists()
    assert Path(waiting.init_image).exists() and fresh.exists()  # queued; and new
