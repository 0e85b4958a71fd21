"""LoRA styles on the FLUX DiT, unfused: each targeted linear layer adds ``scale·(x·Aᵀ)·Bᵀ``.

    weights = read_lora("watercolor.safetensors")          # once per style, host memory
    branches = LoraBranches.attach(pipe.dit, weights.pairs) # once per pipeline, before compile
    with branches.active(weights, alpha=0.8, device="cuda"):
        image = pipe(...)                                   # cleared on the way out, even on error

Why unfused: the DiT's weights are float8 (streamed from host memory or resident), and a
LoRA fused into float8 is rounded into it and cannot be taken out again; ``relayout`` and the
streamer's casts also assume the weights never change. So the weights are never touched: the
branch is computed beside each layer, like diffsynth's own hot-load branch
(``LoRAHotLoadMixin.lora_forward``: ``out + x @ Aᵀ @ Bᵀ``), which is used as is on diffsynth's
VRAM-managed layers (``model.dit_streaming = false``). Everywhere else (our streamed and
resident blocks, ``Float8Linear``, plain bf16 layers) a forward hook adds the same term.

The hooks are installed once and stay: a style is a change of the tensors they read, not of the
hooks, so ``torch.compile``'s graphs stay valid (dynamo does not guard on hooks added after
compiling, so a hook added per job would be silently skipped by a compiled block). The graphs
do specialise on the shapes the hooks read, so on the device each layer's A and B are padded
with zeros to that layer's largest rank among the styles (``LoraBranches.pad_ranks``, from
``pad_ranks``): every style then gives the hooks the same shapes, one set of graphs with a style
serves them all, the backend's warm-up makes it, and no user's first styled job compiles. One
style alone is never padded.

File formats: diffsynth's ``FluxLoRALoader.convert_state_dict`` reads kohya's
``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` (with ``.alpha``), diffusers'
``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (q, k, v merged into diffsynth's
fused ``a_to_qkv`` / ``to_qkv_mlp`` layers) and diffsynth's own names; its
``GeneralLoRALoader.convert_state_dict`` then pairs ``lora_A``/``lora_B`` per layer and applies a
per-layer ``alpha / rank``. Text-encoder LoRA tensors and layers the DiT lacks are counted and
ignored.

Memory: a style's A and B are kept in host memory in bf16 (``LoraWeights.nbytes``): for a LoRA
of every FLUX.1-dev layer about 9.6 MB per rank from a kohya file (rank 16: 0.15 GiB, rank 64:
0.6 GiB), up to 17 MB per rank from a diffusers file, because diffsynth's conversion fuses its
separate q/k/v(/mlp) pairs into block-diagonal B matrices of the fused layers (which also costs
a little compute). While a job uses the style they are copied to the GPU, padded as above
(``LoraWeights.nbytes_at``, kept free by the memory plan: ``DeviceBudget.lora_gib``), and
dropped after it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)
Pair = tuple[torch.Tensor, torch.Tensor]  # (A: rank × in, B: out × rank)


@dataclass(frozen=True)
class LoraWeights:
    """One style's LoRA as the DiT's layers see it."""

    pairs: dict[str, Pair]  # DiT module name -> (A, B), host memory
    ignored: int = 0  # tensors of the file that target no DiT layer (text encoders, unknown)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.pairs.values())

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.pairs.values()), default=0)

    def nbytes_at(self, ranks: Mapping[str, int]) -> int:
        """Its bytes on the device with each layer padded to its rank in ``ranks``."""
        return sum((a.shape[1] + b.shape[0]) * max(ranks.get(name, 0), a.shape[0])
                   * a.element_size() for name, (a, b) in self.pairs.items())

    def fitting(self, targets: Mapping[str, torch.nn.Module]) -> LoraWeights:
        """Only the pairs whose layer is in ``targets`` with the shapes they need."""
        kept = {name: ab for name, ab in self.pairs.items() if _fits(targets.get(name), ab)}
        return LoraWeights(kept, ignored=self.ignored + len(self.pairs) - len(kept))


def convert_lora(state_dict: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.bfloat16) -> dict[str, Pair]:
    """A LoRA file's tensors -> {diffsynth FluxDiT module name: (A, B)} with the file's own
    alpha/rank folded into A, through diffsynth's FLUX and general LoRA converters."""
    from diffsynth.utils.lora.flux import FluxLoRALoader
    from diffsynth.utils.lora.general import GeneralLoRALoader

    loader = FluxLoRALoader(torch_dtype=dtype)
    # its converter scales tensors in place (kohya's alpha): give it copies in float32
    renamed = loader.convert_state_dict({k: v.float().clone() for k, v in state_dict.items()})
    paired = GeneralLoRALoader.convert_state_dict(loader, renamed)
    pairs = {}
    for key, b in paired.items():
        if key.endswith(".lora_B.weight"):
            name = key.removesuffix(".lora_B.weight")
            a = paired[name + ".lora_A.weight"]
            pairs[name] = (_matrix(a).to(dtype).contiguous(), _matrix(b).to(dtype).contiguous())
    return pairs


def _matrix(t: torch.Tensor) -> torch.Tensor:
    return t.squeeze(-1).squeeze(-1) if t.dim() == 4 else t  # 1×1 conv LoRAs (kohya)


def read_lora(path: str, targets: Mapping[str, torch.nn.Module] | None = None,
              dtype: torch.dtype = torch.bfloat16) -> LoraWeights:
    """Read and convert a LoRA file. With ``targets`` (the DiT's modules by name) pairs whose
    layer is missing or whose shapes do not fit are dropped and counted as ignored."""
    from diffsynth.core.loader.file import load_state_dict

    weights = LoraWeights(convert_lora(load_state_dict(path, device="cpu"), dtype))
    return weights if targets is None else weights.fitting(targets)


def _fits(module: torch.nn.Module | None, pair: Pair) -> bool:
    if module is None:
        return False
    a, b = pair
    return (getattr(module, "in_features", None) == a.shape[1]
            and getattr(module, "out_features", None) == b.shape[0] and a.shape[0] == b.shape[1])


def pad_ranks(styles: Iterable[LoraWeights]) -> dict[str, int]:
    """Each layer's largest rank among ``styles``: what ``LoraBranches.pad_ranks`` pads to."""
    ranks: dict[str, int] = {}
    for weights in styles:
        for name, (a, _) in weights.pairs.items():
            ranks[name] = max(ranks.get(name, 0), a.shape[0])
    return ranks


def lora_targets(dit: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The DiT's linear layers by name (``nn.Linear``, diffsynth's wrapped layers and our
    ``Float8Linear``): what a LoRA may target."""
    return {name: m for name, m in dit.named_modules()
            if hasattr(m, "in_features") and hasattr(m, "out_features")}


def _lora_lists(module: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """diffsynth's managed layer's own LoRA lists (attributes torch's typing does not know)."""
    return getattr(module, "lora_A_weights"), getattr(module, "lora_B_weights")  # noqa: B009


def _hot_loadable(module: torch.nn.Module) -> bool:
    """diffsynth's VRAM-managed linear layer, which has the unfused branch built in."""
    return hasattr(module, "lora_A_weights") and hasattr(module, "lora_B_weights")


@dataclass
class _Slot:
    """What one layer's hook adds; ``a`` None: nothing (no style this job)."""

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None

    def hook(self, module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
        a, b = self.a, self.b
        if a is None or b is None:
            return out
        x = args[0]
        return out + (x.to(a.dtype) @ a.T) @ b.T  # alpha is folded into a


@dataclass
class LoraBranches:
    """The hooks on one DiT and the style active in them."""

    modules: dict[str, torch.nn.Module]
    # Each layer's A and B are padded with zeros to its rank here on the device (the branch adds
    # exactly the same): compiled blocks specialise on the ranks (dynamo keeps the shapes of
    # what the hooks read static), so fixed ranks mean one set of graphs, made in the warm-up.
    pad_ranks: dict[str, int] = field(default_factory=dict)
    slots: dict[str, _Slot] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)
    active_bytes: int = 0  # on the device while a style is active
    switch_s: float = 0.0  # the last activation's time (copies to the device included)

    @classmethod
    def attach(cls, dit: torch.nn.Module, names: set[str] | None = None) -> LoraBranches:
        """Hook the layers ``names`` (default: every linear layer of the DiT); diffsynth's
        managed layers need no hook. After ``enable_float8_compute`` (which replaces layers)
        and before ``torch.compile``."""
        targets = lora_targets(dit)
        chosen = {n: m for n, m in targets.items() if names is None or n in names}
        branches = cls(chosen)
        for name, module in chosen.items():
            if _hot_loadable(module):
                continue
            slot = _Slot()
            branches.slots[name] = slot
            branches.handles.append(module.register_forward_hook(slot.hook))
        return branches

    def detach(self) -> None:
        self.clear()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.slots.clear()

    def apply(self, weights: LoraWeights, alpha: float, device: str | torch.device,
              dtype: torch.dtype = torch.bfloat16) -> int:
        """Make ``weights`` × ``alpha`` the active style (after clearing any other); returns
        how many layers it reaches. The A and B matrices are copied to ``device`` here, once
        per job, not per call."""
        started = time.monotonic()
        self.clear()
        reached = 0
        for name, (a, b) in weights.pairs.items():
            module = self.modules.get(name)
            if module is None:
                continue
            a_dev, b_dev = _padded(a, b, self.pad_ranks.get(name, 0), alpha, device, dtype)
            if _hot_loadable(module):  # diffsynth's own branch
                a_list, b_list = _lora_lists(module)
                a_list.append(a_dev)
                b_list.append(b_dev)
            else:
                self.slots[name].a, self.slots[name].b = a_dev, b_dev
            self.active_bytes += a_dev.nbytes + b_dev.nbytes
            reached += 1
        self.switch_s = time.monotonic() - started
        return reached

    def clear(self) -> None:
        """No style: every branch gone, the device copies freed."""
        for slot in self.slots.values():
            slot.a = slot.b = None
        for module in self.modules.values():
            if _hot_loadable(module):
                for weights_list in _lora_lists(module):
                    weights_list.clear()
        self.active_bytes = 0

    @contextlib.contextmanager
    def active(self, weights: LoraWeights | None, alpha: float,
               device: str | torch.device) -> Iterator[None]:
        """The style for one job; cleared afterwards whatever happens (an error, a cancel)."""
        if weights is None:
            yield
            return
        try:
            self.apply(weights, alpha, device)  # a failure half-way leaves nothing on either
            yield
        finally:
            self.clear()


def _padded(a: torch.Tensor, b: torch.Tensor, rank: int, alpha: float,
            device: str | torch.device, dtype: torch.dtype) -> Pair:
    """``alpha``·A and B on ``device``, padded with zeros to ``rank`` (rows of A, columns of B)."""
    r = a.shape[0]
    a_dev = torch.zeros(max(rank, r), a.shape[1], device=device, dtype=dtype)
    b_dev = torch.zeros(b.shape[0], max(rank, r), device=device, dtype=dtype)
    a_dev[:r] = (a.to(device=device, dtype=torch.float32) * alpha).to(dtype)
    b_dev[:, :r] = b.to(device=device, dtype=dtype)
    return a_dev, b_dev
