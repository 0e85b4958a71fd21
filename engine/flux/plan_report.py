"""The memory plan for a card, before any weight is loaded: what ``doctor`` shows an admin.

Pure arithmetic (no torch): the same ``plan_memory`` and ``dit_residency`` the backend runs at
start-up, on FLUX.1-dev's block sizes, plus what the benchmarks measured on emulated cards
(docs/benchmarks.md, ``bench/bench_cards.py``): the host memory a plan needs and the seconds a
1024² 20-step image took through ``python -m bot`` on that GPU class.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.config import ModelSection
from engine.flux.presets import MemoryPlan, float8_applies, plan_memory
from engine.flux.residency import (
    FLUX_FIXED_BYTES,
    FLUX_LAYER_CAST_BYTES,
    FLUX_OTHER_WEIGHTS,
    GIB,
    STREAMED,
    ResidencyError,
    dit_residency,
    flux_dev_block_sizes,
)

# Host peak RSS of the bot on emulated cards: loading peaks near 12.5 GiB whatever the plan;
# after that the streamed blocks and T5 (float8, page-locked) and the parked models stay beside
# the libraries. An upper bound fitted to the H100 runs of 2026-12-07 (default config; GiB of the
# DiT streamed as the bot planned it): 17.45 with 7.94 streamed (6 GB card), 16.75 with 5.99
# (8 GB), 12.3 with 3.98 (10 GB) and less; it overshoots those by 1.3, 0.0 and 2.5 GiB. The
# float8 runs (cards-h100-2026-12-07f.json) peaked lower, 15.4 and 13.6 GiB on 6 and 8 GB: no
# warm-up of theirs went over its plan, and those bf16 ones that did re-planned (moving blocks
# through host memory), which an out-of-memory re-plan may do under float8 too; so the bound
# stays.
LOADING_PEAK_GIB = 12.5
BESIDE_STREAMED_GIB = 10.8
# Seconds per 1024², 20-step image through `python -m bot` (console, queue of several images),
# default config, by the card's free memory at start (GiB): bench/bench_cards.py, the latest run
# of each card (README's hardware table; tests/test_readme_hardware.py keeps the two equal):
# docs/results/cards-h100-2026-12-07f.json and -07g.json (float8 matmuls).
MEASURED_S_PER_IMAGE = {
    "H100": ((5.6, 3.69), (7.5, 2.98), (9.5, 2.81), (11.5, 2.47), (15.5, 2.34),
             (23.0, 2.35)),
}
# The same with bf16 matmuls (float8_compute = false, or a GPU without float8 tensor cores):
# cards-h100-2026-12-07e.json, 9.5 from -07c.json and 15.5 from -07d.json.
MEASURED_S_PER_IMAGE_BF16 = {
    "H100": ((5.6, 3.90), (7.5, 3.31), (9.5, 3.49), (11.5, 3.16), (15.5, 2.97),
             (23.0, 2.89)),
}


@dataclass(frozen=True)
class PlanReport:
    plan: MemoryPlan
    total_blocks: int
    resident_blocks: int | None  # None: not block-streamed (max, or diffsynth's management)
    streamed_gib_per_step: float
    host_needed_gib: float
    expected_s: float | None
    expected_basis: str
    problem: str = ""  # the plan cannot run: why

    def lines(self) -> list[str]:
        out = [self.plan.describe()]
        if self.problem:
            return [*out, self.problem]
        if self.resident_blocks is not None:
            out.append(f"DiT: {self.resident_blocks} of {self.total_blocks} blocks stay on the "
                       f"GPU, {self.streamed_gib_per_step:.2f} GiB streamed per step")
        else:
            out.append("DiT: resident on the GPU" if self.plan.preset == "max"
                       else "DiT: diffsynth's own offloading (model.dit_streaming = false)")
        out.append(f"host memory needed: about {self.host_needed_gib:.1f} GiB")
        if self.expected_s is not None:
            out.append(f"expected: about {self.expected_s:.1f} s per 1024² 20-step image "
                       f"({self.expected_basis})")
        else:
            out.append(f"expected speed: {self.expected_basis}")
        return out


def plan_report(model: ModelSection, max_pixels: int, gpu_name: str, free_gib: float,
                used_gib: float = 0.0, max_images: int = 1) -> PlanReport:
    plan = plan_memory(model, free_gib, used_gib, max_pixels, max_images=max_images)
    sizes = flux_dev_block_sizes()
    resident: int | None = None
    streamed = 0
    problem = ""
    if plan.streaming:
        try:
            others = dataclasses.replace(FLUX_OTHER_WEIGHTS, parked=plan.park_models)
            residency = dit_residency(plan, sizes, FLUX_FIXED_BYTES, others,
                                      FLUX_LAYER_CAST_BYTES)
        except ResidencyError as e:
            problem = str(e)
        else:
            resident = len(sizes) - residency.count(STREAMED)
            streamed = residency.streamed_bytes
    elif plan.preset != "max":
        streamed = sum(sizes)
    host = max(LOADING_PEAK_GIB, streamed / GIB + BESIDE_STREAMED_GIB)
    # the table is keyed by the card's free memory before the bot's own CUDA context existed
    card = plan.device_budget.device_gib if plan.device_budget is not None else free_gib
    seconds, basis = expected_seconds(gpu_name, card, float8_applies(plan, model))
    return PlanReport(plan, len(sizes), resident, streamed / GIB, host, seconds, basis, problem)


def expected_seconds(gpu_name: str, free_gib: float,
                     float8: bool = True) -> tuple[float | None, str]:
    """The measured figure of the largest card not larger than this one, on this GPU class,
    with the plan's matmuls (float8 or bf16)."""
    table = MEASURED_S_PER_IMAGE if float8 else MEASURED_S_PER_IMAGE_BF16
    kind = "float8" if float8 else "bf16"
    for gpu, rows in table.items():
        if gpu.lower() in gpu_name.lower():
            fits = [(card, s) for card, s in rows if card <= free_gib + 0.05]
            if not fits:
                return None, f"not measured on a {gpu} with under {rows[0][0]:.1f} GiB free"
            card, seconds = fits[-1]
            return seconds, f"measured on a {gpu} with {card:.1f} GiB free, {kind} matmuls"
    return None, (f"not measured on {gpu_name or 'this GPU'} yet (docs/benchmarks.md has the "
                  "H100 figures; consumer cards stream weights over a slower bus)")
