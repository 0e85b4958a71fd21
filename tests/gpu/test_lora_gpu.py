"""LoRA styles on the real FLUX backend on a GPU (issue 13), random weights in the FLUX.1-dev
layout: a LoRA of zeros leaves the image as it was, a random one changes it (and again the same
way when switched back to), and the next plain image is the first one again (the style is
cleared after its job).

Both on a streamed ``low`` plan (float8 blocks, most of them streamed from host memory under an
8 GiB ``vram_limit_gib``: a plan's shape, not a card-size claim) and on ``max`` (everything bf16
resident), with torch.compile on as the default config has it: the hooks under inductor on CUDA.
The backend is built as the engine builds it (``create_backend``, ``[styles]`` configured), one
per preset for the module's tests; 512² 4-step images of one seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.make_random_lora import write_lora
from engine.config import Config, StyleSection
from engine.request import ImageRequest
from tests.gpu.test_flux_gpu import assert_real_image, model_section

torch = pytest.importorskip("torch")
from torch._dynamo.utils import counters  # noqa: E402  (new graphs: a job that compiled)

pytestmark = pytest.mark.gpu
SIZE = 512
SAME = 0.05  # mean pixel gap (0–255) of one seed's image made twice: test_flux_gpu's measure


@dataclass
class Styled:
    backend: Any  # FluxBackend
    images: dict[str, Image.Image]
    graphs_compiled_by_jobs: int  # dynamo's new graphs after start-up (the warm-up made them)


def styled_request(style: str = "") -> ImageRequest:
    return ImageRequest(prompt="a red fox in snow", seed=7, steps=4, width=SIZE, height=SIZE,
                        guidance=3.5, style=style)


def gap(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


@pytest.fixture(scope="module")
def styles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StyleSection]:
    """Two styles of different ranks (8 and 16, diffusers layout; on the GPU the rank-8 one is
    padded to the other's ranks, so the warm-up's graphs with a style serve both): a LoRA of
    zeros and a random one."""
    folder = tmp_path_factory.mktemp("loras")
    zeros = write_lora(folder / "zeros.safetensors", 8, "diffusers", std=0.0)
    # 0.05: each layer's branch about half its output (random DiT weights: std 0.02)
    noisy = write_lora(folder / "noisy.safetensors", 16, "diffusers", std=0.05, seed=1)
    return {"zeros": StyleSection(file=str(zeros)), "noisy": StyleSection(file=str(noisy))}


@pytest.fixture(scope="module", params=["low", "max"], ids=["low-streamed", "max"])
def styled(request: pytest.FixtureRequest, random_flux: Path,
           styles: dict[str, StyleSection]) -> Iterator[Styled]:
    """One backend of the preset with both styles, and its images in this order: plain, noisy,
    zeros (switched from noisy), noisy again (switched back), plain again."""
    from engine.backends import create_backend

    config = Config()
    config.model = model_section(random_flux, request.param,
                                 8.0 if request.param == "low" else None, compile=True)
    config.limits.max_pixels = SIZE * SIZE  # warm-ups at 512² only
    config.styles = styles
    # Blocks compiled by earlier tests in this process share these blocks' code, and dynamo
    # does not guard on module hooks: their graphs, made without the LoRA hooks, could serve.
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    backend = create_backend(config)
    try:
        backend.load()
        graphs = counters["stats"]["unique_graphs"]
        images = {}
        for name, style in [("plain", ""), ("noisy", "noisy"), ("zeros", "zeros"),
                            ("noisy again", "noisy"), ("plain again", "")]:
            [images[name]] = backend.generate(styled_request(style), lambda i, n: None)
        yield Styled(backend, images, counters["stats"]["unique_graphs"] - graphs)
    finally:
        backend.close()
        torch._dynamo.reset()  # the hooked graphs go with this backend
        torch.cuda.empty_cache()


def test_the_plan_and_the_hooks_are_the_ones_meant(styled) -> None:
    backend = styled.backend
    plan = backend.plan
    assert backend._compiled, "torch.compile fell back to eager: the check would be vacuous"
    assert backend._branches is not None and backend._branches.slots  # hooks, not diffsynth's
    if plan.preset == "low":
        assert plan.streaming and backend._stream.stats()["streamed_blocks"] > 0
    else:
        assert plan.preset == "max"
    for image in styled.images.values():
        assert_real_image(image, SIZE)


def test_no_styled_job_waits_for_the_compiler(styled) -> None:
    """The warm-up compiled the blocks with a branch of either rank; the jobs reuse its graphs
    (on an H100 a user's first styled job had compiled for 10-16 s)."""
    assert styled.graphs_compiled_by_jobs == 0


def test_a_lora_of_zeros_leaves_the_image_as_it_was(styled) -> None:
    """Also after another style: the switch replaced its branch, nothing of it stayed."""
    images = styled.images
    exact = np.array_equal(np.asarray(images["zeros"]), np.asarray(images["plain"]))
    assert gap(images["zeros"], images["plain"]) < SAME, f"bit-identical: {exact}"


def test_a_random_lora_changes_the_image_the_same_way_each_time(styled) -> None:
    images = styled.images
    repeat = gap(images["plain"], images["plain again"])
    changed = gap(images["noisy"], images["plain"])
    assert changed > max(SAME, 5 * repeat), (changed, repeat)
    assert gap(images["noisy again"], images["noisy"]) < SAME  # switched back: the same style


def test_the_style_is_cleared_after_its_job(styled) -> None:
    branches = styled.backend._branches
    assert branches.active_bytes == 0
    assert all(slot.a is None and slot.b is None for slot in branches.slots.values())
    assert gap(styled.images["plain again"], styled.images["plain"]) < SAME
