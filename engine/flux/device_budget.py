"""What this process may hold on the GPU, and what of it goes to what: the device budget.

Pure arithmetic, no torch, so that ``doctor`` and the tests can make the same plan anywhere.

A card's memory is not PyTorch's allocator's alone. On a real 8 GB card with 7.5 GiB free,
everything the process will ever hold comes out of those 7.5 GiB:

    device budget (vram_limit_gib, or what was free at start + our own CUDA context)
      = CUDA context                          held before anything is planned
      + runtime                               kernels loaded on first use (cuBLAS, cuDNN,
                                              Triton/Inductor modules), workspaces outside the
                                              allocator
      + fragmentation margin                  what the caching allocator holds but cannot use
      + calibration                           what the start-up warm-up measured above the plan
      + LoRA                                  the largest [styles] LoRA, on the GPU during its jobs
      + allocator budget                      what the memory plan (presets, residency) divides:
          weights kept on the GPU, the block streamer's buffers, the DiT's activations at the
          largest image the limits allow (any aspect ratio: they scale with the pixel count),
          and the other phases (VAE decode, streamed T5), which run while the DiT's buffers
          are released.

The runtime and margin figures are measured (docs/benchmarks.md: emulated cards, the device's
free memory as the driver reports it); the warm-up at start-up checks them on the card at hand
and tightens the plan when the real peak came closer to the budget than ``CALIBRATION_SAFETY``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

GIB = 1024**3
# The process's CUDA context right after torch creates it (torch 2.11, CUDA 13, lazy module
# loading; an H100 shows 0.5 GiB, consumer cards a little less). Only used when vram_limit_gib
# is set: with auto, the free memory at start is measured after the context exists.
CUDA_CONTEXT_GIB = 0.5
# Kernels loaded as they are first used and workspaces outside PyTorch's allocator. With the
# fragmentation margin it was 0.94-1.06 GiB on emulated 6, 8 and 12 GB cards, where kernels,
# workspaces and fragmentation took 0.05-0.1 GiB together (H100, expandable segments;
# docs/benchmarks.md): measured use with room to spare, and the warm-up checks it per card.
RUNTIME_RESERVE_GIB = 0.25
# With expandable segments the allocator's unusable remainder is small but not nil.
FRAGMENTATION_GIB = 0.1
FRAGMENTATION_FRACTION = 0.01
# The warm-up's measured peak must stay this far under the device budget, or the plan tightens.
CALIBRATION_SAFETY_GIB = 0.25
# Blocks' float8 pages are worth more on the GPU than an untiled VAE decode's speed when tiling
# frees at least this much (each GiB resident saves 20 GiB of copies per 20-step image).
TILE_VAE_GAIN_GIB = 0.5


@dataclass(frozen=True)
class DeviceBudget:
    """GiB figures; ``allocator_gib`` is what the memory plan may divide."""

    device_gib: float  # everything this process may hold on the GPU
    context_gib: float  # its CUDA context, held already
    runtime_gib: float = RUNTIME_RESERVE_GIB
    margin_gib: float = 0.0
    calibration_gib: float = 0.0  # added by start-up calibration and out-of-memory re-plans
    source: str = ""  # "vram_limit_gib" or "free at start"
    lora_gib: float = 0.0  # the largest style's A and B matrices (engine/flux/lora.py)

    @property
    def allocator_gib(self) -> float:
        return max(0.0, self.device_gib - self.context_gib - self.runtime_gib - self.margin_gib
                   - self.calibration_gib - self.lora_gib)

    @property
    def growth_gib(self) -> float:
        """What the process may add on the device after the plan was made (context excluded)."""
        return self.device_gib - self.context_gib

    def tightened(self, more_gib: float) -> DeviceBudget:
        return dataclasses.replace(self, calibration_gib=self.calibration_gib + more_gib)

    def describe(self) -> str:
        calibration = (f" + calibration {self.calibration_gib:.2f}"
                       if self.calibration_gib else "")
        lora = f" + LoRA styles {self.lora_gib:.2f}" if self.lora_gib else ""
        return (f"device budget {self.device_gib:.2f} GiB ({self.source}) = CUDA context "
                f"{self.context_gib:.2f} + kernels/workspaces {self.runtime_gib:.2f} + "
                f"fragmentation margin {self.margin_gib:.2f}{calibration}{lora} + allocator "
                f"{self.allocator_gib:.2f}")


def device_budget(vram_limit_gib: float, free_gib: float | None,
                  context_gib: float = CUDA_CONTEXT_GIB,
                  lora_gib: float = 0.0) -> DeviceBudget | None:
    """The budget from the config and the card: ``vram_limit_gib`` when set (everything the
    process may hold, its context included), else what was free at start plus the context the
    process holds already. None without a GPU figure (no CUDA)."""
    if vram_limit_gib > 0:
        device, source = vram_limit_gib, "vram_limit_gib"
    elif free_gib is None:
        return None
    else:
        device, source = free_gib + context_gib, "free at start"
    rest = max(0.0, device - context_gib - RUNTIME_RESERVE_GIB)
    margin = FRAGMENTATION_GIB + FRAGMENTATION_FRACTION * rest
    return DeviceBudget(device, context_gib, RUNTIME_RESERVE_GIB, margin, 0.0, source, lora_gib)


def calibration_excess_gib(budget: DeviceBudget, measured_growth_gib: float) -> float:
    """GiB to take off the allocator budget after a warm-up whose peak grew the process by
    ``measured_growth_gib`` since the plan was made (0: within budget and safety)."""
    excess = measured_growth_gib + CALIBRATION_SAFETY_GIB - budget.growth_gib
    return max(0.0, excess)


def reserve_side(max_pixels: int, multiple: int = 16) -> int:
    """The side of a square image at least as large as any the limits allow: the DiT's
    activations and the VAE decode grow with the pixel count, not with the shape."""
    return int(math.ceil(math.sqrt(max_pixels) / multiple) * multiple)


def warm_up_side(max_pixels: int, multiple: int = 16) -> int:
    """The largest square image the limits allow, for the start-up warm-up."""
    return int(math.isqrt(max_pixels) // multiple * multiple)
