"""Float8 matmuls for the DiT's large linear layers (``model.float8_compute``, on by default).

    report = enable_float8_compute(pipe.dit)   # max: the DiT resident on the GPU in bf16
    report.layers, report.bytes_saved          # weights now float8 + one scale per row
    report = enable_float8_matmuls(stream.dit)  # low/balanced: block-streamed with layer_cast

Each large ``nn.Linear`` inside the transformer blocks becomes a ``Float8Linear``: its weight is
stored as float8_e4m3fn with one float32 scale per output row (amax / 448, so every row uses the
whole float8 range), and each call scales the activations per token the same way and multiplies
with ``torch._scaled_mm``, which applies both scales in the matmul's epilogue and returns bf16.

Why not diffsynth's float8 compute (``computation_dtype=float8_e4m3fn``): it casts without scales
(weights of ~0.02 fall into float8's subnormals), measured a relative error of 0.125 on the DiT
output, was slower than bf16 (0.303 s/step) and fails on the RMSNorm layers.

What stays bf16: the modulation layers (AdaLayerNorm: one token per image, nothing to gain),
the embedders and the final projection outside the blocks, norms, and attention itself.
Speed needs the blocks compiled (``model.compile``): then the per-token scaling of the
activations is fused into one kernel before each matmul; eagerly it costs extra passes.

Block streaming with ``layer_cast`` (``streaming.CastLinear``) keeps the DiT's weights as the
checkpoint stores them, float8 with no scale, and casts each to bf16 for its matmul. With float8
compute those layers become ``Float8CastLinear``: the stored float8 weight goes into
``_scaled_mm`` as it is (scale 1 per row, so the weights are exactly the ones bf16 would use),
only the activations are scaled per token, and the cast goes too. Float8 tensor cores peak at
twice bf16's rate on Ada and Hopper (in ``max`` the whole step measured 1.28× faster), which
matters where the step is compute-bound (``--n 4``, cards from 10 GB up). The plan then keeps no
block as a bf16 copy (``MemoryPlan.float8_matmul``): the memory goes to more float8 blocks on
the GPU instead. Through ``python -m bot`` on emulated cards of an H100 a 1024² image took 5–22%
less time than in bf16, and ``--n 4`` on 8 GB 23% less (docs/benchmarks.md, 2026-12-07 float8).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.flux.streaming import CastLinear, dit_blocks

log = logging.getLogger(__name__)
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
ALIGN = 16  # _scaled_mm needs both matrix dimensions divisible by 16
_TINY = 1e-12  # keeps an all-zero row's scale positive


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 values, float32 scale per row) with ``values * scale ≈ x`` row by row. The
    row maxima are taken in x's own dtype (exact) and the division in place, so eagerly it
    holds an fp32 copy and the float8 values at once (5 bytes a value), not more."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / FP8_MAX
    x32 = x.float() if x.dtype != torch.float32 else x.clone()  # never divide the caller's x
    return x32.div_(scale).to(FP8), scale


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16,
                  fast_accum: bool = True) -> torch.Tensor:
    """``x @ weight.T * weight_scale + bias`` in one float8 matmul: ``x`` quantized per token,
    ``weight`` float8 (out, in) row-major, ``weight_scale`` float32 (1, out)."""
    shape = x.shape
    xq, x_scale = quantize_rows(x.reshape(-1, weight.shape[1]))
    # weight.t() is the column-major (in, out) operand _scaled_mm wants, without a copy
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale,
                         out_dtype=out_dtype, use_fast_accum=fast_accum)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight.shape[0])


class Float8Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with W and x in float8, each scaled per row; output bf16."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = True) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype
        # Hopper's fast float8 accumulation (partial sums promoted to fp32 less often): what
        # torchao uses for inference too; False = the slower, fully fp32-accumulated kernel
        self.fast_accum = fast_accum
        self.register_buffer("weight", weight)  # float8 (out, in), row-major
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # float32 (1, out)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Float8Linear:
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight)
            bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        return cls(weight, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_linear(x, self.weight, self.weight_scale, self.bias, self.out_dtype,
                             self.fast_accum)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 rows"


class Float8CastLinear(CastLinear):
    """A ``CastLinear`` whose float8 weight goes into a float8 matmul as stored (scale 1), with
    the activations scaled per token; a bf16 weight (a resident bf16 copy) takes the plain
    matmul. Given in place (``__class__``), like ``CastLinear``, so the block streamer's views
    of its buffers and slots, hooks and names are untouched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        # a bf16 copy of the block, or an input the row-scaled kernel cannot return (CUDA's
        # gives bf16 only): the cast matmul
        if weight.dtype != FP8 or x.dtype != torch.bfloat16:
            return super().forward(x)
        ones = torch.ones((1, self.out_features), device=x.device, dtype=torch.float32)
        return scaled_linear(x, weight, ones, self.bias)


@dataclass(frozen=True)
class Float8Report:
    layers: int  # linear layers converted
    kept: int  # linear layers inside the blocks left in bf16 (modulation, odd shapes)
    bytes_before: int
    bytes_after: int
    streamed: bool = False  # the block streamer's stored float8 weights, multiplied as they are

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def describe(self) -> str:
        if self.streamed:
            return (f"float8 compute: {self.layers} linear layers multiply their stored float8 "
                    f"weights directly, activations scaled per token ({self.kept} kept in bf16)")
        return (f"float8 compute: {self.layers} linear layers in float8 with per-row scales "
                f"({self.kept} kept in bf16), weights {self.bytes_before / 2**30:.1f} -> "
                f"{self.bytes_after / 2**30:.1f} GiB")


def convertible(module: torch.nn.Module, parent: torch.nn.Module) -> bool:
    """A block's linear layer worth float8: not a modulation layer (its input is one token per
    image) and with both dimensions divisible by 16."""
    if not isinstance(module, torch.nn.Linear):
        return False
    if "Norm" in type(parent).__name__:  # AdaLayerNorm, AdaLayerNormSingle
        return False
    return module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0


def _block_children(dit: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str,
                                                            torch.nn.Module]]:
    """(parent, name, child) for every module inside the DiT's blocks, listed before any is
    replaced."""
    for block in dit_blocks(dit):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                yield parent, name, child


def enable_float8_compute(dit: torch.nn.Module) -> Float8Report:
    """Replace the blocks' large linear layers in place (one at a time, so the bf16 weight of
    a layer is freed as soon as its float8 copy exists). Idempotent."""
    layers = kept = before = after = 0
    for parent, name, child in _block_children(dit):
        if isinstance(child, Float8Linear):
            continue
        if not convertible(child, parent):
            kept += isinstance(child, torch.nn.Linear)
            continue
        assert isinstance(child, torch.nn.Linear)
        before += _nbytes(child)
        replacement = Float8Linear.from_linear(child)
        setattr(parent, name, replacement)
        after += _nbytes(replacement)
        layers += 1
    report = Float8Report(layers, kept, before, after)
    log.info("%s", report.describe())
    return report


def enable_float8_matmuls(dit: torch.nn.Module) -> Float8Report:
    """Give the ``CastLinear`` layers of a block-streamed DiT (``layer_cast``) float8 matmuls,
    in place; the modulation layers and odd shapes keep theirs. Idempotent; the streamer's
    ``close`` makes them ``nn.Linear`` again."""
    layers = kept = 0
    for parent, _, child in _block_children(dit):
        if type(child) is Float8CastLinear:
            continue
        if type(child) is CastLinear and convertible(child, parent):
            child.__class__ = Float8CastLinear
            layers += 1
        else:
            kept += isinstance(child, torch.nn.Linear)
    report = Float8Report(layers, kept, 0, 0, streamed=True)
    log.info("%s", report.describe())
    return report


def disable_float8_matmuls(dit: torch.nn.Module) -> int:
    """Undo ``enable_float8_matmuls`` in place (the layers cast their weights again); how many
    layers changed back."""
    undone = 0
    for module in dit.modules():
        if type(module) is Float8CastLinear:
            module.__class__ = CastLinear  # type: ignore[assignment]  # narrowed above
            undone += 1
    return undone


def _nbytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_float8_matmul(device: str | torch.device) -> str | None:
    """None when this device runs row-scaled float8 matmuls, else why not (for the log):
    they need an Ada or Hopper GPU (compute capability 8.9 or newer) or a recent CPU build."""
    dev = torch.device(device)
    # on by default, so no failure here (no driver, a CPU-only build) may stop a load
    try:
        if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
            name = torch.cuda.get_device_name(dev)
            return f"{name} has no float8 tensor cores (needs compute capability 8.9+)"
        a = torch.ones(16, 16, device=dev, dtype=FP8)
        one = torch.ones(16, 1, device=dev)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, AssertionError) as e:  # CPU-only: AssertionError
        return f"row-scaled float8 matmul unavailable here ({e})"
    return None
