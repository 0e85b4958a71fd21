"""Memory presets as plain data: where each FLUX model's weights live and where they are computed.

No torch here: the plan is made from numbers (the free GPU memory at start-up, or the configured
``vram_limit_gib``) so it can be tested and printed by ``doctor`` on any machine. ``pipeline.py``
turns a plan into diffsynth ``ModelConfig``s. The GiB figures below are the allocator budget:
what is left of the device budget once the CUDA context, kernels and workspaces and a
fragmentation margin are set aside (``device_budget.py``).

    preset     DiT                             text encoders, VAE           fits (GiB budget)
    low        float8, block streaming          T5 streamed, CLIP/VAE res.  below 18 (run: 6-12 GB)
    balanced   float8, block streaming          T5 streamed, CLIP/VAE res.  >= 18
    max        bf16 resident                    bf16 resident               >= 36
    auto       the largest of the above that fits the budget

With ``model.park_models`` (the default) CLIP, the VAE and T5's embedding are
parked instead (``parking.py``): kept in page-locked host memory and copied to the GPU for their
own phase only (CLIP and T5's embedding for the prompt, the VAE for its encode or decode), so the
denoising loop has their 0.63 GiB for DiT blocks.

"Block streaming" (``model.dit_streaming``, the default) is ours: the DiT is loaded on the CPU in
float8, and ``engine/flux/streaming.py`` keeps the blocks that fit the budget on the GPU and
streams the rest from page-locked memory while the previous block computes (``residency.py``
plans which); T5 is block-streamed the same way. With streaming, ``low`` and ``balanced`` lay out
alike and differ only in the budget ``auto`` gives them. With ``dit_streaming = false`` the DiT
uses diffsynth's own VRAM management instead (the seed's set-up in ``low``: text encoders and
VAE streamed by diffsynth, a layer copied to the GPU per call except those it keeps while the
device's used memory stays under ``vram_limit``; float8 resident DiT in ``balanced``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from engine.config import ModelSection
from engine.flux.device_budget import DeviceBudget, device_budget, reserve_side

GIB = 1024**3
# Budgets (GiB) at which auto picks a preset. Peak allocation at 1024² measured on an H100
# (docs/benchmarks.md): everything bf16 resident 34.2; DiT float8 resident 11.1 + activations.
MAX_MIN_GIB = 36.0
BALANCED_MIN_GIB = 18.0
# Kept free under the budget. diffsynth decides residency layer by layer while a step's
# activations are alive, so they are mostly counted already; 0.5 GiB is its own example's margin
# (total - 0.5). Measured on an H100 at a 12 GiB cap: 11.6 GiB reserved at the peak.
ACTIVATION_RESERVE_GIB = 0.5
# Each out-of-memory retry in the low preset halves what resident layers may use; below this
# nothing stays resident.
LOW_FLOOR_GIB = 2.0
FP8 = "float8_e4m3fn"
BF16 = "bfloat16"
# The least the block streamer runs a 1024² image with (everything streamed, tiled VAE decode):
# residency.minimum_budget_bytes for FLUX.1-dev, about 2.7 GiB, plus room for CLIP, the VAE and
# T5's embedding (0.63 GiB, on the GPU in their own phases), rounded up.
STREAM_MIN_GIB = 3.5


@dataclass(frozen=True)
class Placement:
    """diffsynth's ``vram_config`` for one model; ``offload_device=None`` means unmanaged:
    the model is loaded once onto the computation device in the computation dtype."""

    computation_device: str
    computation_dtype: str = BF16
    offload_device: str | None = None
    offload_dtype: str | None = None
    onload_device: str | None = None
    onload_dtype: str | None = None
    preparing_device: str | None = None
    preparing_dtype: str | None = None

    @property
    def managed(self) -> bool:
        return self.offload_device is not None

    def vram_config(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)


def resident(device: str, dtype: str = BF16) -> Placement:
    """Loaded once onto the GPU. A float8 copy is kept there and cast to bf16 per layer call."""
    if dtype == BF16:
        return Placement(computation_device=device)
    return Placement(device, BF16, device, dtype, device, dtype, device, dtype)


def streamed(device: str, dtype: str, host: str = "cpu") -> Placement:
    """Kept in host memory; diffsynth copies a layer to the GPU per call, or keeps it there
    while the device stays under ``vram_limit`` (the "preparing" state)."""
    return Placement(device, BF16, host, dtype, host, dtype, device, dtype)


@dataclass(frozen=True)
class MemoryPlan:
    preset: str  # the resolved preset: low, balanced or max
    device: str
    dit: Placement
    clip: Placement
    t5: Placement
    vae: Placement
    vram_limit_gib: float | None  # what diffsynth compares the device's used memory against
    budget_gib: float | None
    vae_tiled: bool = False
    reason: str = ""
    used_at_start_gib: float = 0.0  # device memory others (and the CUDA context) held at start
    stream_dit: bool = False  # block-stream the DiT in low/balanced (model.dit_streaming)
    device_budget: DeviceBudget | None = None  # budget_gib is its allocator_gib
    max_pixels: int = 1024 * 1024  # the largest image the limits allow: activations are kept for it
    batch_images: int = 1  # images of max_pixels a DiT block computes at once (model.batch_images)
    pass_images: int = 1  # images of one job that go through the DiT together (limits.images_max)
    park_models: bool = True  # streaming: CLIP, the VAE, T5's embedding parked (model.park_models)
    layer_cast: bool = True  # streaming: the DiT's layers cast their weights (model.layer_cast)
    # streaming with layer_cast: float8 matmuls on the stored weights (model.float8_compute, as
    # planned_config leaves it), so no block is kept as a bf16 copy
    float8_matmul: bool = False

    @property
    def streaming(self) -> bool:
        """The DiT is loaded on the CPU in float8 and laid out by the block streamer."""
        return self.stream_dit and self.preset in ("low", "balanced")

    @property
    def stream_t5(self) -> bool:
        """T5 is loaded on the CPU in float8 and block-streamed too."""
        return self.streaming and not self.t5.managed and self.t5.computation_device == "cpu"

    @property
    def placements(self) -> dict[str, Placement]:
        return {"dit": self.dit, "clip": self.clip, "t5": self.t5, "vae": self.vae}

    @property
    def reserve_side(self) -> int:
        """The square side whose activations cover every image the limits allow."""
        return reserve_side(self.max_pixels)

    def activation_bytes(self) -> int:
        """The DiT activations the plan keeps room for (``activation_reserve``)."""
        return activation_reserve(self.max_pixels, self.batch_images, self.pass_images)

    def batch_for(self, width: int, height: int, count: int) -> int:
        """How many of a pass's ``count`` images of this size each DiT block computes at once:
        as many as the activations kept for ``batch_images`` of the largest size hold (smaller
        images pack more)."""
        from engine.flux.residency import dit_activation_bytes

        side = self.reserve_side
        kept, size = dit_activation_bytes(side, side, batch=self.batch_images), max(1, count)
        while size > 1 and dit_activation_bytes(width, height, batch=size) > kept:
            size -= 1
        return size

    def _batch_text(self) -> str:
        at_once = "one image" if self.batch_images == 1 else f"{self.batch_images} images"
        if self.pass_images <= 1:
            return at_once
        return f"{at_once} at a time in passes of up to {self.pass_images}"

    def describe(self) -> str:
        """One line in plain numbers: the preset, the budget and where it goes."""
        parts = [f"preset {self.preset}"]
        if self.streaming:
            parts.append("DiT block streaming")
        if self.vae_tiled:
            parts.append("tiled VAE decode")
        if self.vram_limit_gib is not None and not self.streaming and self.preset != "max":
            parts.append(f"diffsynth vram_limit {self.vram_limit_gib:.1f} GiB of device use")
        head = ", ".join(parts)
        if self.device_budget is not None:
            budget = self.device_budget.describe()
        elif self.budget_gib is not None:
            budget = f"allocator budget {self.budget_gib:.2f} GiB"
        else:
            budget = "no GPU memory figure"
        return (f"{head}: {budget}; activations kept for "
                f"{self._batch_text()} up to {self.max_pixels:,} px; "
                f"{self.reason}")


def activation_reserve(max_pixels: int, batch_images: int, pass_images: int) -> int:
    """GPU bytes of DiT activations to keep free: a pass of ``pass_images`` of the largest
    size, ``batch_images`` of them computed at once (engine/flux/batch.py)."""
    from engine.flux.residency import dit_pass_bytes

    side = reserve_side(max_pixels)
    return dit_pass_bytes(side, side, chunk=batch_images,
                          images=max(pass_images, batch_images))


def resolve_budget(config: ModelSection, free_gib: float | None,
                   lora_gib: float = 0.0) -> DeviceBudget | None:
    """The device budget: ``vram_limit_gib`` when set, else what was free at start-up; the
    largest LoRA style (``lora_gib``) is set aside from what the plan divides."""
    return device_budget(config.vram_limit_gib, free_gib, lora_gib=lora_gib)


def choose_preset(config: ModelSection, budget_gib: float | None) -> tuple[str, str]:
    """(preset, why) from the allocator budget. ``auto`` without a known budget (no CUDA)
    takes ``low``, the frugal one."""
    if config.preset != "auto":
        return config.preset, f"preset {config.preset} set in config"
    if budget_gib is None:
        return "low", "auto: no GPU memory figure, so the frugal preset"
    for preset, minimum in (("max", MAX_MIN_GIB), ("balanced", BALANCED_MIN_GIB)):
        if budget_gib >= minimum:
            return preset, f"auto: allocator budget {budget_gib:.1f} GiB >= {minimum:.0f} GiB"
    return "low", f"auto: allocator budget {budget_gib:.1f} GiB < {BALANCED_MIN_GIB:.0f} GiB"


def plan_memory(config: ModelSection, free_gib: float | None = None,
                used_gib: float = 0.0, max_pixels: int = 1024 * 1024,
                lora_gib: float = 0.0, max_images: int = 1) -> MemoryPlan:
    """The plan for this machine. ``free_gib``: what this process may still allocate on the
    device at start-up (None without CUDA); ``used_gib``: what the whole device holds already;
    ``max_pixels``: the largest image the limits allow; ``lora_gib``: the largest style's LoRA,
    on the GPU while a job uses it; ``max_images``: the most images a job may ask for
    (``limits.images_max``), which go through the DiT in one pass."""
    budget = resolve_budget(config, free_gib, lora_gib)
    allocator = None if budget is None else budget.allocator_gib
    preset, why = choose_preset(config, allocator)
    return make_plan(preset, config.device, allocator, used_gib=used_gib, reason=why,
                     stream_dit=config.dit_streaming and config.device.startswith("cuda"),
                     device_budget=budget, max_pixels=max_pixels,
                     batch_images=config.batch_images, pass_images=max_images,
                     park_models=config.park_models, layer_cast=config.layer_cast,
                     float8_matmul=config.float8_compute is not False and config.layer_cast)


def make_plan(preset: str, device: str, budget_gib: float | None, used_gib: float = 0.0,
              reason: str = "", vae_tiled: bool = False, stream_dit: bool = False,
              device_budget: DeviceBudget | None = None,
              max_pixels: int = 1024 * 1024, batch_images: int = 1,
              pass_images: int = 1, park_models: bool = True,
              layer_cast: bool = True, float8_matmul: bool = False) -> MemoryPlan:
    dev = device
    extra: dict[str, Any] = {"reason": reason, "used_at_start_gib": used_gib,
                             "vae_tiled": vae_tiled, "device_budget": device_budget,
                             "max_pixels": max_pixels, "batch_images": batch_images,
                             "pass_images": pass_images, "park_models": park_models,
                             "layer_cast": layer_cast, "float8_matmul": float8_matmul}
    if preset == "max":
        plain = resident(dev)
        return MemoryPlan("max", dev, plain, plain, plain, plain, None, budget_gib,
                          stream_dit=stream_dit, **extra)
    limit = _vram_limit(dev, budget_gib, used_gib)
    if stream_dit and preset in ("low", "balanced"):
        extra["vae_tiled"] = vae_tiled or should_tile_vae(
            budget_gib, max_pixels, batch_images, pass_images, park_models, layer_cast,
            float8_matmul)
        return _streaming_plan(preset, dev, budget_gib, limit, extra)
    if preset == "balanced":
        return MemoryPlan("balanced", dev, resident(dev, FP8), resident(dev), streamed(dev, BF16),
                          resident(dev), limit, budget_gib, **extra)
    if preset == "low":
        bf16 = streamed(dev, BF16)
        return MemoryPlan("low", dev, streamed(dev, FP8), bf16, bf16, bf16, limit, budget_gib,
                          **extra)
    raise ValueError(f"unknown memory preset {preset!r}; use low, balanced, max or auto")


def should_tile_vae(budget_gib: float | None, max_pixels: int, batch_images: int = 1,
                    pass_images: int = 1, park_models: bool = True,
                    layer_cast: bool = True, float8_matmul: bool = False) -> bool:
    """Tile the VAE decode when its untiled peak is what limits the DiT's resident blocks: the
    budget cannot keep every block resident, and tiling frees at least ``TILE_VAE_GAIN_GIB``
    for them (the decode runs while the streamer's buffers and the DiT's activations are
    released, so only the part of it above those counts)."""
    from engine.flux.device_budget import TILE_VAE_GAIN_GIB
    from engine.flux.residency import (
        FLUX_FIXED_BYTES,
        FLUX_OTHER_WEIGHTS,
        flux_dev_block_sizes,
        layer_work_bytes,
        minimum_budget_bytes,
        t5_phase_bytes,
        vae_decode_bytes,
    )

    if budget_gib is None:
        return False
    side = reserve_side(max_pixels)
    sizes = flux_dev_block_sizes()
    reserve = activation_reserve(max_pixels, batch_images, pass_images)
    others = dataclasses.replace(FLUX_OTHER_WEIGHTS, parked=park_models)
    untiled = others.phase_bytes(vae_decode_bytes(side, side), t5_phase_bytes())
    tiled = others.phase_bytes(vae_decode_bytes(side, side, tiled=True), t5_phase_bytes())
    # what tiling frees: the difference between the least budgets that stream everything
    # the layers' own casts (or float8 inputs), no work buffer
    cast = layer_work_bytes(layer_cast, float8_matmul, max_pixels, batch_images)
    gain = (minimum_budget_bytes(sizes, reserve, phase_reserve_bytes=untiled,
                                 layer_cast_bytes=cast)
            - minimum_budget_bytes(sizes, reserve, phase_reserve_bytes=tiled,
                                   layer_cast_bytes=cast))
    loop = minimum_budget_bytes(sizes, reserve, layer_cast_bytes=cast)  # buffers + activations
    everything = FLUX_FIXED_BYTES + sum(sizes) + others.always
    fits_resident = budget_gib * GIB >= everything + max(loop, untiled)
    return not fits_resident and gain >= TILE_VAE_GAIN_GIB * GIB


def _vram_limit(device: str, budget_gib: float | None, used_gib: float) -> float | None:
    """diffsynth compares the whole device's used memory (other processes and the CUDA context
    included) with vram_limit, so the limit is what was used at start plus our budget."""
    if budget_gib is None:
        # unknown budget on a GPU: keep nothing resident rather than risk an OOM
        return 0.0 if device.startswith("cuda") else None
    return max(0.0, used_gib + budget_gib - ACTIVATION_RESERVE_GIB)


def _streaming_plan(preset: str, dev: str, budget_gib: float | None, limit: float | None,
                    extra: dict[str, Any]) -> MemoryPlan:
    """The DiT on the CPU in float8, unmanaged (the streamer lays it out after loading).

    T5's 4.7 B weights are loaded in float8 on the CPU too (half the RAM) and block-streamed
    the same way (it runs once per image, so none of it needs to stay resident). CLIP and the
    VAE (0.4 GB together) are loaded onto the GPU in bf16 and stay there (or are parked whole
    with ``model.park_models``: ``pipeline.park_other_models``), not left to diffsynth's VRAM
    management: under it their layers would settle on the GPU whenever the device's used memory
    is under ``vram_limit``, taking memory the streamer's plan had kept for activations (an
    image then ran out of memory in T5 after an out-of-memory re-plan at 6 GiB). So ``low`` and
    ``balanced`` lay out alike; the residency planner fits the DiT to whatever budget is left."""
    dit = Placement(computation_device="cpu", computation_dtype=FP8)
    return MemoryPlan(preset, dev, dit, resident(dev), dit, resident(dev), limit, budget_gib,
                      stream_dit=True, **extra)


def tighter(plan: MemoryPlan) -> MemoryPlan | None:
    """The next plan after an out-of-memory error, or None when nothing tighter is left.

    max -> balanced -> low -> low with half the vram_limit and a tiled VAE decode -> ...
    -> low with nothing resident (every layer copied per call).
    """
    why = f"tightened after running out of GPU memory (was {plan.preset})"
    if plan.preset in ("max", "balanced"):
        lower = "balanced" if plan.preset == "max" else "low"
        return make_plan(lower, plan.device, plan.budget_gib, plan.used_at_start_gib, why,
                         plan.vae_tiled, device_budget=plan.device_budget, **_carried(plan))
    if plan.streaming:
        return _tighter_streaming(plan, why)
    if plan.vram_limit_gib is None or plan.vram_limit_gib <= 0:
        return None if plan.vae_tiled else dataclasses.replace(plan, vae_tiled=True, reason=why)
    limit = plan.vram_limit_gib / 2
    return dataclasses.replace(plan, vram_limit_gib=limit if limit >= LOW_FLOOR_GIB else 0.0,
                               vae_tiled=True, reason=why)


def _tighter_streaming(plan: MemoryPlan, why: str) -> MemoryPlan | None:
    """Streaming: first tile the VAE decode, then give the streamer a quarter less each time,
    down to the least it can run with (everything streamed)."""
    if not plan.vae_tiled:
        return dataclasses.replace(plan, vae_tiled=True, reason=why)
    if plan.budget_gib is None or plan.budget_gib * 0.75 < STREAM_MIN_GIB:
        return None
    return with_less(plan, plan.budget_gib * 0.25, why)


def with_less(plan: MemoryPlan, less_gib: float, why: str) -> MemoryPlan | None:
    """The same preset with ``less_gib`` taken off the allocator budget (the device budget
    records it as calibration), or None below the streamer's least."""
    assert plan.budget_gib is not None
    budget = plan.budget_gib - less_gib
    if budget < STREAM_MIN_GIB and plan.streaming:
        return None
    device = None if plan.device_budget is None else plan.device_budget.tightened(less_gib)
    return make_plan(plan.preset, plan.device, budget, plan.used_at_start_gib, why,
                     vae_tiled=plan.vae_tiled, device_budget=device, **_carried(plan))


def _carried(plan: MemoryPlan) -> dict[str, Any]:
    """What a re-plan keeps from the plan before it: the configured set-up and the limits'
    sizes (``make_plan``'s keyword arguments)."""
    return {"stream_dit": plan.stream_dit, "max_pixels": plan.max_pixels,
            "batch_images": plan.batch_images, "pass_images": plan.pass_images,
            "park_models": plan.park_models, "layer_cast": plan.layer_cast,
            "float8_matmul": plan.float8_matmul}


def float8_wanted(model: ModelSection) -> bool:
    """Whether the config asks for float8 matmuls on this set-up, before asking the GPU:
    ``true``, or ``"auto"`` with compiled blocks on a CUDA device (eager, the per-token scaling
    costs more than float8 saves: docs/benchmarks.md, issue 5)."""
    if model.float8_compute == "auto":
        return model.compile and model.device.startswith("cuda")
    return model.float8_compute is True


def planned_config(model: ModelSection, problem: str | None) -> ModelSection:
    """The config a memory plan follows: float8 matmuls (which keep no DiT block as a bf16 copy)
    only where they are wanted and the device runs them (``problem``: the answer of
    ``float8_compute.check_float8_matmul``, None when it does)."""
    if model.float8_compute is False or (float8_wanted(model) and problem is None):
        return model
    return dataclasses.replace(model, float8_compute=False)


def float8_applies(plan: MemoryPlan, model: ModelSection) -> bool:
    """Whether float8 matmuls run in this plan (of ``planned_config``'s config): the streamed
    DiT with ``layer_cast``, whose stored float8 weights are multiplied as they are, or ``max``
    when asked for with ``true`` (its bf16 weights re-quantized per row)."""
    if model.float8_compute is False:
        return False
    return plan.float8_matmul and plan.streaming or (plan.preset == "max"
                                                    and model.float8_compute is True)
