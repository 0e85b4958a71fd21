"""Which DiT blocks stay on the GPU and which are streamed from pinned host memory: the plan.

Pure arithmetic, no torch, so it can be tested and printed anywhere. ``streaming.py`` carries a
plan out. A block is one transformer block (FLUX.1: 19 double-stream, then 38 single-stream);
its weight matrices are stored as float8 (1 byte a weight) and computed in bf16 (2 bytes).

    placement   where the block's weights live                    per-pass cost
    bf16        on the GPU in the compute dtype                   nothing
    fp8         on the GPU in float8, cast for its matmuls        one cast on the GPU
    streamed    pinned host memory, copied ahead on a side stream one copy over PCIe + a cast

GPU memory the plan accounts for (all of it made once, at start-up, and kept):

    fixed (non-block weights, norms and biases in bf16)
  + resident blocks (fp8 bytes, or twice that in bf16)
  + the bf16 work buffer (the largest non-bf16 block; with ``layer_cast_bytes``, what the
    layers' own casts hold at once)                        when any block is fp8 or streamed
  + ``slots`` float8 staging buffers (the largest streamed block)  when any block is streamed
  + the reserve: the largest image's DiT activations
  <= budget, and, for the other phases (VAE decode, text encoders), during which the streamer
  releases its work buffer and slots (``StreamingHandle.release_buffers``):
    fixed + resident blocks + the phase reserve <= budget

Rules: (1) minimise the estimated pass time, then the bytes streamed, then keep the most
headroom; (2) with nothing streamed, spend what is left on bf16 copies (no cast per use), all of
them when they fit; (3) resident blocks are spread evenly through the execution order so that
the copy engine always has compute to hide behind.

The pass-time estimate: blocks of one size (one block type) take compute time in proportion to
their bytes, and copying a streamed block takes ``transfer_compute_ratio`` times its compute, so
a group of total size T with S bytes streamed costs max(T, ratio * S). Streaming the same
fraction of every group keeps the demand on the copy engine even through the pass; streaming
one group heavily makes that stretch transfer-bound while the copy engine idles elsewhere
(measured on an H100 at 8 GiB, compiled: 0.174 s/step with the double blocks streamed, against
0.127 s of compute and 0.120 s of copies).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from engine.flux.presets import MemoryPlan

GIB = 1024**3
MIB = 1024**2
BF16, FP8, STREAMED = "bf16", "fp8", "streamed"

# FLUX.1-dev DiT (diffsynth FluxDiT): elements in the weight matrices of one block.
FLUX_HIDDEN = 3072
FLUX_DOUBLE_BLOCK_WEIGHTS = FLUX_HIDDEN * (2 * 6 + 2 * 3 + 2 * 1 + 4 * 4) * FLUX_HIDDEN  # 339.7 M
FLUX_SINGLE_BLOCK_WEIGHTS = FLUX_HIDDEN * (3 + 7 + 5) * FLUX_HIDDEN  # 141.6 M
FLUX_DOUBLE_BLOCKS, FLUX_SINGLE_BLOCKS = 19, 38
# Embedders, final norm/projection and every block's biases and norm scales, in bf16.
FLUX_FIXED_BYTES = 150 * MIB
# The bf16 weights a block's layers hold at once when they cast their own (streaming's
# layer_cast): its two largest, a single block's to_qkv_mlp (3072 x 21504) and proj_out
# (15360 x 3072); see ``largest_casts_bytes``.
FLUX_LAYER_CAST_BYTES = FLUX_HIDDEN * (7 + 5) * FLUX_HIDDEN * 2
# Float8 matmuls (model.float8_compute on the streamed DiT) quantize each layer's input per token:
# eagerly an fp32 copy and its float8 values (5 bytes a value) of the widest input, a single
# block's proj_out (15360 wide); compiled, the two fuse into the float8 values alone.
FLUX_WIDEST_INPUT = 5 * FLUX_HIDDEN
FLOAT8_INPUT_BYTES_PER_VALUE = 5
# Copy time / compute time of a block: H100 (PCIe 5, 55 GB/s pinned) with compiled blocks at
# 1024² is 1.7, eager 1.1, at 512² about 3; a consumer card (PCIe 4, slower compute) ~0.8.
DEFAULT_TRANSFER_COMPUTE_RATIO = 1.5
MAX_ENUMERATED_PLANS = 200_000  # beyond this many count combinations, fill greedily

# Activation and decode peaks above the weights, measured on an H100 with torch 2.11 and
# diffsynth 2.1.12 (bench/bench_streaming.py): the DiT, eager, 0.62 GiB at 1024² (47 bytes per
# token x hidden channel; 0.43 GiB with compiled blocks); the VAE decode 2.48 GiB at 1024²
# untiled (2544 B/px), 0.53 GiB at 512², 0.55 GiB at 1024² with 64-latent tiles.
DIT_BYTES_PER_TOKEN_CHANNEL = 48
# An image of a pass waiting while a block computes another chunk (engine/flux/batch.py): its
# rows of the block's input and of the block's output, bf16.
DIT_WAITING_BYTES_PER_TOKEN_CHANNEL = 4
VAE_BYTES_PER_PIXEL = 2600  # untiled
VAE_TILED_BYTES = 640 * MIB  # tile_size=64, tile_stride=32 (latent units): size-independent
ALLOCATOR_SLACK = 0.10  # fragmentation of the caching allocator
RESERVE_FLOOR_BYTES = 256 * MIB


class ResidencyError(ValueError):
    """The budget cannot hold even the streaming buffers and the reserve."""


def flux_dev_block_sizes(storage_itemsize: int = 1) -> list[int]:
    """Storage bytes of FLUX.1-dev's 57 blocks in execution order (double, then single)."""
    return ([FLUX_DOUBLE_BLOCK_WEIGHTS * storage_itemsize] * FLUX_DOUBLE_BLOCKS
            + [FLUX_SINGLE_BLOCK_WEIGHTS * storage_itemsize] * FLUX_SINGLE_BLOCKS)


def _check_size(width: int, height: int, batch: int) -> None:
    if width <= 0 or height <= 0 or batch <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height} (batch {batch})")


def _with_slack(nbytes: float) -> int:
    return int(max(RESERVE_FLOOR_BYTES, nbytes * (1 + ALLOCATOR_SLACK)))


def layer_work_bytes(layer_cast: bool, float8_matmul: bool, max_pixels: int,
                     batch_images: int = 1, cast_bytes: int = FLUX_LAYER_CAST_BYTES) -> int:
    """What the blocks' layers hold besides the activations when they compute from their own
    float8 weights (``layer_cast``): the bf16 casts of the largest two (``cast_bytes``), or
    with float8 matmuls the quantized input of the widest layer, for the images a block
    computes at once, if that is more (the modulations still cast theirs)."""
    if not layer_cast:
        return 0
    if not float8_matmul:
        return cast_bytes
    tokens = max_pixels // 256 + 512  # 16×16 pixels a token, and the prompt's 512
    quantized = batch_images * tokens * FLUX_WIDEST_INPUT * FLOAT8_INPUT_BYTES_PER_VALUE
    return max(cast_bytes, quantized)


def dit_activation_bytes(width: int, height: int, *, text_tokens: int = 512,
                         hidden: int = FLUX_HIDDEN, batch: int = 1) -> int:
    """Peak GPU bytes of the DiT's activations for one image (one block's live tensors),
    with allocator slack: the plan's ``reserve_bytes``."""
    _check_size(width, height, batch)
    tokens = (math.ceil(width / 16) * math.ceil(height / 16) + text_tokens) * batch
    return _with_slack(tokens * hidden * DIT_BYTES_PER_TOKEN_CHANNEL)


def dit_pass_bytes(width: int, height: int, *, chunk: int = 1, images: int = 1,
                   text_tokens: int = 512, hidden: int = FLUX_HIDDEN) -> int:
    """Peak GPU bytes of a DiT pass over ``images`` images that each block computes ``chunk`` at
    a time (engine/flux/batch.py): one chunk's activations plus the rows of the others."""
    _check_size(width, height, images)
    chunk = max(1, min(chunk, images))
    tokens = (math.ceil(width / 16) * math.ceil(height / 16) + text_tokens) * (images - chunk)
    waiting = tokens * hidden * DIT_WAITING_BYTES_PER_TOKEN_CHANNEL * (1 + ALLOCATOR_SLACK)
    return dit_activation_bytes(width, height, text_tokens=text_tokens, hidden=hidden,
                                batch=chunk) + int(waiting)


def vae_decode_bytes(width: int, height: int, *, batch: int = 1, tiled: bool = False) -> int:
    """Peak GPU bytes of diffsynth's VAE decode above its weights, with allocator slack: the
    plan's ``phase_reserve_bytes`` (add the VAE's weights when they are not resident)."""
    _check_size(width, height, batch)
    return _with_slack(VAE_TILED_BYTES if tiled else width * height * batch * VAE_BYTES_PER_PIXEL)


# T5-XXL (FLUX's second text encoder): one block's weight matrices, attention 4·d² and gated
# feed-forward 3·d·d_ff with d = 4096, d_ff = 10240
T5_BLOCK_WEIGHTS = 4096 * (4 * 4096 + 3 * 10240)  # 192.9 M
T5_ACTIVATION_BYTES = 256 * MIB  # 512 tokens: 64 heads of 512² scores, 10240-wide FF, position bias


def t5_phase_bytes(slots: int = 2) -> int:
    """Peak GPU bytes of block-streamed T5 above its resident embedding: its bf16 work buffer,
    its float8 staging slots and its activations, with allocator slack. A phase of its own, like
    the VAE decode: the DiT's buffers and activations are released while it runs."""
    return _with_slack(T5_BLOCK_WEIGHTS * (2 + slots) + T5_ACTIVATION_BYTES)


def activation_reserve_bytes(width: int, height: int, *, text_tokens: int = 512,
                             hidden: int = FLUX_HIDDEN, batch: int = 1,
                             vae_tiled: bool = False) -> int:
    """GPU bytes to keep free at all times when the streamer's buffers are never released:
    the larger of the DiT activations and the VAE decode (they never overlap)."""
    return max(dit_activation_bytes(width, height, text_tokens=text_tokens, hidden=hidden,
                                    batch=batch),
               vae_decode_bytes(width, height, batch=batch, tiled=vae_tiled))


@dataclass(frozen=True)
class ResidencyPlan:
    placements: tuple[str, ...]  # one per block, execution order: bf16, fp8 or streamed
    block_bytes: tuple[int, ...]  # storage (float8) bytes of each block's weights
    budget_bytes: int
    reserve_bytes: int
    fixed_bytes: int
    slots: int
    compute_itemsize: int = 2
    storage_itemsize: int = 1
    phase_reserve_bytes: int = 0  # VAE decode / text encoders, with the buffers released
    # > 0: the blocks' layers cast their own weights (streaming's layer_cast), holding this many
    # bf16 bytes at once (``largest_casts_bytes``) instead of a work buffer of the largest block
    layer_cast_bytes: int = 0

    def _compute_bytes(self, i: int) -> int:
        return self.block_bytes[i] * self.compute_itemsize // self.storage_itemsize

    @property
    def streamed(self) -> tuple[int, ...]:
        return tuple(i for i, p in enumerate(self.placements) if p == STREAMED)

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied host -> GPU in one pass over the blocks (one DiT call)."""
        return sum(self.block_bytes[i] for i in self.streamed)

    @property
    def slot_bytes(self) -> int:
        return max((self.block_bytes[i] for i in self.streamed), default=0)

    @property
    def work_bytes(self) -> int:
        cast = [self._compute_bytes(i) for i, p in enumerate(self.placements) if p != BF16]
        if cast and self.layer_cast_bytes:
            return self.layer_cast_bytes
        return max(cast, default=0)

    @property
    def resident_bytes(self) -> int:
        return sum(self._compute_bytes(i) if p == BF16 else self.block_bytes[i]
                   for i, p in enumerate(self.placements) if p != STREAMED)

    @property
    def weights_gpu_bytes(self) -> int:
        """Everything the plan allocates for the denoising loop (the reserve excluded)."""
        return self.fixed_bytes + self.resident_bytes + self.buffer_bytes

    @property
    def buffer_bytes(self) -> int:
        return self.work_bytes + self.slots * self.slot_bytes

    @property
    def peak_bytes(self) -> int:
        """The most the plan can have allocated at once, in any phase."""
        kept = self.fixed_bytes + self.resident_bytes
        return kept + max(self.buffer_bytes + self.reserve_bytes, self.phase_reserve_bytes)

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.peak_bytes

    def count(self, placement: str) -> int:
        return sum(1 for p in self.placements if p == placement)

    def transfer_floor_s(self, h2d_bytes_per_s: float) -> float:
        """Seconds per pass the copies alone need at the given host -> GPU bandwidth."""
        return self.streamed_bytes / h2d_bytes_per_s

    def describe(self) -> str:
        gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
        return (f"{self.count(BF16)} blocks bf16, {self.count(FP8)} fp8 resident, "
                f"{self.count(STREAMED)} streamed ({gib(self.streamed_bytes)}/pass); "
                f"GPU weights+buffers {gib(self.weights_gpu_bytes)}, reserve "
                f"{gib(self.reserve_bytes)} (other phases {gib(self.phase_reserve_bytes)}), "
                f"peak {gib(self.peak_bytes)} of {gib(self.budget_bytes)}")


def minimum_budget_bytes(block_sizes_bytes: Sequence[int], reserve_bytes: int,
                         fixed_bytes: int = 0, slots: int = 2, compute_itemsize: int = 2,
                         storage_itemsize: int = 1, phase_reserve_bytes: int = 0,
                         layer_cast_bytes: int = 0) -> int:
    """The smallest budget that runs: everything streamed."""
    biggest = max(block_sizes_bytes)
    work = layer_cast_bytes or biggest * compute_itemsize // storage_itemsize
    buffers = slots * biggest + work
    return fixed_bytes + max(reserve_bytes + buffers, phase_reserve_bytes)


def plan_residency(block_sizes_bytes: Sequence[int], budget_bytes: int, reserve_bytes: int, *,
                   fixed_bytes: int = 0, slots: int = 2, compute_itemsize: int = 2,
                   storage_itemsize: int = 1, allow_bf16: bool = True,
                   phase_reserve_bytes: int = 0,
                   transfer_compute_ratio: float = DEFAULT_TRANSFER_COMPUTE_RATIO,
                   layer_cast_bytes: int = 0) -> ResidencyPlan:
    """The residency plan for blocks of the given storage sizes (execution order).

    ``reserve_bytes``: free memory the denoising loop needs (``dit_activation_bytes`` of the
    largest image); ``phase_reserve_bytes``: what the VAE decode and text encoders need while
    the streamer's buffers are released (``vae_decode_bytes``; 0 when they never are, in which
    case fold the VAE into ``reserve_bytes``: ``activation_reserve_bytes``);
    ``transfer_compute_ratio``: see the module docstring (0: only minimise bytes streamed)."""
    sizes = tuple(int(s) for s in block_sizes_bytes)
    if not sizes or min(sizes) <= 0:
        raise ValueError("block_sizes_bytes must list at least one positive size")
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    if budget_bytes <= 0 or min(reserve_bytes, fixed_bytes, phase_reserve_bytes) < 0:
        raise ValueError("budget must be positive and reserve/fixed bytes not negative")
    base: dict[str, Any] = dict(block_bytes=sizes, budget_bytes=int(budget_bytes),
                reserve_bytes=int(reserve_bytes), fixed_bytes=int(fixed_bytes), slots=slots,
                compute_itemsize=compute_itemsize, storage_itemsize=storage_itemsize,
                phase_reserve_bytes=int(phase_reserve_bytes),
                layer_cast_bytes=int(layer_cast_bytes))
    if allow_bf16:
        all_bf16 = ResidencyPlan(placements=(BF16,) * len(sizes), **base)
        if all_bf16.headroom_bytes >= 0:
            return all_bf16
    plan = _best_fp8_plan(sizes, base, transfer_compute_ratio)
    if plan is None:
        need = minimum_budget_bytes(sizes, reserve_bytes, fixed_bytes, slots,
                                    compute_itemsize, storage_itemsize, phase_reserve_bytes,
                                    layer_cast_bytes)
        raise ResidencyError(
            f"a GPU budget of {budget_bytes / GIB:.2f} GiB is too small: streaming the DiT "
            f"needs at least {need / GIB:.2f} GiB ({reserve_bytes / GIB:.2f} GiB of it kept "
            f"for activations); use a smaller image size or a larger vram_limit")
    return _upgrade_to_bf16(plan) if allow_bf16 else plan


def _groups(sizes: tuple[int, ...]) -> dict[int, list[int]]:
    """Block indices by size, largest size first."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    return dict(sorted(groups.items(), reverse=True))


def _spread(indices: list[int], keep: int) -> set[int]:
    """``keep`` of ``indices`` evenly spaced (resident blocks between streamed ones)."""
    n = len(indices)
    return {indices[int((j + 0.5) * n / keep)] for j in range(keep)} if keep else set()


def _plan_for_counts(sizes: tuple[int, ...], groups: dict[int, list[int]],
                     counts: Sequence[int], base: dict) -> ResidencyPlan:
    resident: set[int] = set()
    for members, keep in zip(groups.values(), counts, strict=True):
        resident |= _spread(members, keep)
    placements = tuple(FP8 if i in resident else STREAMED for i in range(len(sizes)))
    return ResidencyPlan(placements=placements, **base)


def pass_cost(plan: ResidencyPlan, ratio: float) -> float:
    """The pass-time estimate, in bytes of compute: sum over size groups of max(T, ratio * S)."""
    total: dict[int, int] = {}
    streamed: dict[int, int] = {}
    for size, placement in zip(plan.block_bytes, plan.placements, strict=True):
        total[size] = total.get(size, 0) + size
        streamed[size] = streamed.get(size, 0) + (size if placement == STREAMED else 0)
    return sum(max(total[g], ratio * streamed[g]) for g in total)


def _best_fp8_plan(sizes: tuple[int, ...], base: dict, ratio: float) -> ResidencyPlan | None:
    groups = _groups(sizes)
    ranges = [range(len(members) + 1) for members in groups.values()]
    if math.prod(len(r) for r in ranges) > MAX_ENUMERATED_PLANS:
        return _greedy_fp8_plan(sizes, groups, base)
    best, best_key = None, None
    for counts in itertools.product(*ranges):
        plan = _plan_for_counts(sizes, groups, counts, base)
        if plan.headroom_bytes < 0:
            continue
        key = (pass_cost(plan, ratio), plan.streamed_bytes, -plan.headroom_bytes)
        if best_key is None or key < best_key:
            best, best_key = plan, key
    return best


def _greedy_fp8_plan(sizes: tuple[int, ...], groups: dict[int, list[int]],
                     base: dict) -> ResidencyPlan | None:
    """Many distinct sizes: keep the largest blocks first while they fit."""
    counts = [0] * len(groups)
    plan = _plan_for_counts(sizes, groups, counts, base)
    if plan.headroom_bytes < 0:
        return None
    for g, members in enumerate(groups.values()):
        for _ in members:
            counts[g] += 1
            trial = _plan_for_counts(sizes, groups, counts, base)
            if trial.headroom_bytes < 0:
                counts[g] -= 1
                break
            plan = trial
    return plan


def _upgrade_to_bf16(plan: ResidencyPlan) -> ResidencyPlan:
    """Spend the headroom on bf16 copies of fp8-resident blocks, largest first."""
    placements = list(plan.placements)
    order = sorted((i for i, p in enumerate(placements) if p == FP8),
                   key=lambda i: -plan.block_bytes[i])
    current = plan
    for i in order:
        placements[i] = BF16
        trial = ResidencyPlan(**{**current.__dict__, "placements": tuple(placements)})
        if trial.headroom_bytes < 0:
            placements[i] = FP8
            continue
        current = trial
    return current


@dataclass(frozen=True)
class OtherWeights:
    """GPU bytes of the models besides the DiT, by the phase that runs them. ``parked``
    (engine/flux/parking.py): each is on the GPU only during its own phase, so the denoising
    loop has their room; otherwise all of them stay on the GPU throughout."""

    text: int = 0  # CLIP and T5's non-block weights (its embedding), bf16
    encode: int = 0  # the VAE encoder (image-to-image), bf16
    decode: int = 0  # the VAE decoder, bf16
    parked: bool = True
    resident: int = 0  # held on the GPU throughout by anything else (allocated before the DiT)

    @property
    def total(self) -> int:
        return self.text + self.encode + self.decode

    @property
    def always(self) -> int:
        """Bytes on the GPU in every phase, the denoising loop's included."""
        return self.resident + (0 if self.parked else self.total)

    def phase_bytes(self, vae_bytes: int, t5_bytes: int) -> int:
        """The largest of the other phases: the VAE's (``vae_bytes``: its decode's
        activations, which a tiled encode does not exceed) and the text encoders'
        (``t5_bytes``: streamed T5's buffers and activations), with the weights each
        fetches when parked."""
        if not self.parked:
            return max(vae_bytes, t5_bytes)
        return max(vae_bytes + max(self.decode, self.encode), t5_bytes + self.text)


# FLUX.1-dev's other models (bench/make_random_flux.py's layout of the real files): CLIP-L 234.7
# MiB and T5's embedding and norms 251.4 MiB; the VAE encoder 65.4 MiB, its decoder 94.5 MiB.
FLUX_OTHER_WEIGHTS = OtherWeights(text=487 * MIB, encode=66 * MIB, decode=95 * MIB)


def dit_residency(plan: MemoryPlan, block_bytes: Sequence[int], fixed_bytes: int,
                  others: OtherWeights, layer_cast_bytes: int = 0) -> ResidencyPlan:
    """The DiT's residency under a memory plan: its allocator budget less what the other
    models keep on the GPU throughout (``others.always``), with the DiT's activations kept
    for the largest image the limits allow and the VAE and the text encoders budgeted as
    phases of their own (they run while the streamer's buffers are released; parked models
    are on the GPU then only). A pass of several images is kept too
    (``MemoryPlan.activation_bytes``); its decode runs one image at a time.
    ``layer_cast_bytes``: what the layers' bf16 casts hold at once (``largest_casts_bytes``);
    the plan's own set-up says what its layers hold (``layer_work_bytes``)."""
    if plan.budget_gib is None:
        raise ValueError("streaming needs a known GPU budget")
    side = plan.reserve_side
    phase = others.phase_bytes(vae_decode_bytes(side, side, tiled=plan.vae_tiled),
                               t5_phase_bytes() if plan.stream_t5 else 0)
    left = int(plan.budget_gib * GIB) - others.always
    if left <= 0:
        raise ResidencyError(
            f"a GPU budget of {plan.budget_gib:.2f} GiB is too small: the text encoders and "
            f"the VAE alone keep {others.always / GIB:.2f} GiB on the GPU; free GPU memory or "
            "use a smaller image size")
    work = layer_work_bytes(plan.layer_cast, plan.float8_matmul, plan.max_pixels,
                            plan.batch_images, cast_bytes=layer_cast_bytes)
    # float8 matmuls multiply the stored float8 weights: a bf16 copy would take the bf16 path
    return plan_residency(block_bytes, left,
                          plan.activation_bytes(), fixed_bytes=fixed_bytes,
                          phase_reserve_bytes=phase, layer_cast_bytes=work,
                          allow_bf16=not plan.float8_matmul)
