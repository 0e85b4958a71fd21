"""GPU tests: the real FLUX backend on a random-weight checkpoint (``bench/make_random_flux.py``).

They run only where CUDA is available (marker ``gpu``); elsewhere they are skipped, so CI stays
green. The checkpoint is taken from ``RANDOM_FLUX_DIR`` (the device recipe makes it once) or
written to a temporary folder (about 34 GB, a minute on a GPU machine).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

GIB = 1024**3


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test marked ``gpu`` is skipped where PyTorch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def random_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder that holds ``black-forest-labs/FLUX.1-dev/...`` with random weights."""
    from bench import make_random_flux

    given = os.environ.get("RANDOM_FLUX_DIR")
    root = Path(given) if given else tmp_path_factory.mktemp("random-flux")
    if not (root / make_random_flux.REPO_DIR / make_random_flux.VAE_FILE).exists():
        make_random_flux.make(root)
    return root


@pytest.fixture
def emulated_card() -> Iterator:
    """``with emulated_card(free_gib) as card:`` another process holds all of the GPU but
    ``free_gib``, so the code under test sees a card of that size, context and kernels
    included; ``card.report()["peak_gib"]`` is what this process held at most, as the driver
    saw it. The way every test that names a card size runs."""
    from bench.emulated_card import EmulatedCard

    def start(free_gib: float) -> EmulatedCard:
        torch.cuda.empty_cache()  # what earlier tests left cached belongs to no card
        return EmulatedCard(free_gib)

    yield start
    torch.cuda.empty_cache()


@pytest.fixture
def cap_gpu() -> Iterator:
    """``cap_gpu(gib)`` caps PyTorch's allocator alone (``set_per_process_memory_fraction``):
    a labelled comparison for the streamer's own arithmetic, never a card-size claim (the CUDA
    context, kernels and workspaces stay outside the cap; see ``emulated_card``)."""

    def cap(gib: float | None) -> None:
        torch.cuda.empty_cache()
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else gib * GIB / total)
        torch.cuda.reset_peak_memory_stats()

    yield cap
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()
