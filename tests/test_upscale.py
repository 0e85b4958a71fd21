"""Upscale 2×: tiles that cover the image within the pixel budget, a blend without seams, and
the whole path (console, engine, dry-run backend) from a finished job to a 2× PNG."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bot.console import CONSOLE_USER, ConsoleAdapter
from engine import variants
from engine.config import LimitsSection
from engine.errors import InvalidCommand
from engine.png import read_parameters
from engine.request import ImageRequest
from engine.upscale import OVERLAP, feather, tile_side, tiles, upscale


def test_tiles_cover_the_image_within_the_budget_and_overlap() -> None:
    side = tile_side(1_048_576, 16)
    assert side == 1024
    boxes = tiles(2048, 1536, side)
    covered = Image.new("L", (2048, 1536), 0)
    for left, top, right, bottom in boxes:
        assert (right - left) * (bottom - top) <= 1_048_576
        assert (right - left) % 16 == 0 and (bottom - top) % 16 == 0
        covered.paste(255, (left, top, right, bottom))
    assert covered.getextrema() == (255, 255)  # every pixel in some tile
    xs = sorted({b[0] for b in boxes})
    assert all(b - a <= side - OVERLAP for a, b in zip(xs, xs[1:], strict=False))
    assert tiles(512, 512, side) == [(0, 0, 512, 512)]  # small enough: one tile


def test_the_feather_fades_only_towards_neighbours() -> None:
    mask = feather((1024, 1024), (0, 0, 1024, 1024), (2048, 1024))  # a right neighbour
    assert mask.getpixel((0, 512)) == 255 and mask.getpixel((1023, 512)) < 30
    assert mask.getpixel((512, 0)) == 255  # the image's own edge stays opaque


def test_upscale_refines_every_tile_and_leaves_no_seam(tmp_path: Path) -> None:
    start = tmp_path / "start.png"
    Image.new("RGB", (512, 512), (90, 120, 150)).save(start)
    request = ImageRequest("fox", seed=1, steps=10, width=1024, height=1024, guidance=3.5,
                           init_image=str(start), strength=0.3, upscale_tile=640)
    seen: list[tuple[int, int]] = []
    steps: list[tuple[int, int]] = []

    def refine(tile: Image.Image, part: ImageRequest, on_step) -> Image.Image:  # type: ignore[no-untyped-def]
        seen.append((part.width, part.height))
        assert part.upscale_tile == 0 and part.strength == 0.3
        for i in range(1, part.steps_run + 1):
            on_step(i, part.steps_run)
        return Image.new("RGB", tile.size, (200, 40, 40))  # every tile redrawn the same

    image = upscale(request, refine, lambda i, n: steps.append((i, n)))
    assert image.size == (1024, 1024) and len(seen) == 4
    assert all(w * h <= 640 * 640 for w, h in seen)
    assert steps[-1] == (12, 12)  # 4 tiles × ⌈10 × 0.3⌉ steps
    # tiles that agree blend to the same colour everywhere: no seam, nothing of the start left
    assert image.getcolors() == [(1024 * 1024, (200, 40, 40))]


async def test_console_upscale_makes_a_2x_png_of_the_chosen_image(engine_factory) -> None:  # type: ignore[no-untyped-def]
    import io

    engine = await engine_factory()
    out = io.StringIO()
    console = ConsoleAdapter(engine, stdin=io.StringIO(), stdout=out)
    grid = await console.imagine("/imagine a fox --seed 5 --n 2 --steps 10 --size 512x512")
    await console.followers.wait_all()
    await console.handle_line(f"/upscale {grid.id} 2")
    await console.followers.wait_all()
    [up] = [r for r in await engine.store.jobs_for_user(CONSOLE_USER) if r.job_id != grid.id]
    assert (up.request.width, up.request.height, up.request.seed) == (1024, 1024, 6)
    assert up.request.init_image.endswith(f"{grid.id}-6.png") and up.request.count == 1
    png = Path(up.result_path).read_bytes()
    assert Image.open(io.BytesIO(png)).size == (1024, 1024)
    params = read_parameters(png)
    assert params["Seed"] == "6" and params["Size"] == "1024x1024"
    assert params["Source"] == f"upscale 2× of {grid.id} #2"
    assert (params["Denoising strength"], params["Upscale"]) == ("0.3", "2")
    assert f"upscale 2× of {grid.id} #2" in out.getvalue()
    with pytest.raises(InvalidCommand, match="upscale already"):
        await console.handle_line(f"/upscale {up.job_id} 1")
    with pytest.raises(InvalidCommand, match="original image"):
        variants.reroll(up.request, LimitsSection())
