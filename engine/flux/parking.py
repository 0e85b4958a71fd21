"""Models parked in host memory between their phases: on the GPU only while they run.

    parked = park_module(pipe.text_encoder_1, "cuda")   # weights now in page-locked host memory
    pipe.text_encoder_1(ids)   # a forward pre-hook copies them to the GPU first (one copy)
    pipe.load_models_to_device(["dit"])   # diffsynth's phase change calls offload(): parked
    parked.close()             # unhooked, weights left in (pageable) host memory

Why: on a card that streams the DiT, every byte kept on the GPU for the denoising loop is a byte
less of DiT blocks resident, and each streamed block crosses PCIe on every step. CLIP, T5's
embedding and the VAE (0.6 GiB in bf16) run once per image, outside that loop: parked, they
cost one copy per image in their own phase (about 12 ms on PCIe 5.0; none for CLIP and T5 when
the prompt's embeddings are kept) and give the loop their room, which the residency plan spends
on DiT blocks: 20 steps a image that each stream that much less.

A model's tensors (weights and buffers) are packed, one flat buffer per dtype, into host memory
that is page-locked in place (``page_lock.register_host``); its parameters are views into it.
Fetching allocates the GPU buffers first (all or nothing: an out-of-memory error leaves the model
parked and consistent) and then copies and points the parameters at them. Parking points them
back at the host views and lets the GPU buffers go; nothing is copied back, since inference never
changes a weight.

diffsynth's own mechanism is used for the timing: the pipeline calls ``offload()`` on every model
flagged ``vram_management_enabled`` that the next phase does not name (``load_models_to_device``),
as it does for the block streamers (``StreamingHandle.follow_pipeline_phases``). Fetching is
lazy, at the model's first call, so a prompt whose embeddings are kept never brings CLIP or T5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.flux.page_lock import register_host, unregister_host

ALIGN_BYTES = 256


@dataclass
class _Slot:
    tensor: torch.Tensor  # the parameter or buffer object whose .data is repointed
    offset: int  # elements into its dtype's flat buffer
    shape: torch.Size


@dataclass
class ParkedModel:
    """One model's tensors, parked in host memory and fetched to ``device`` when it runs."""

    device: torch.device
    slots: dict[torch.dtype, list[_Slot]]
    host: dict[torch.dtype, torch.Tensor]  # flat, page-locked where CUDA allows
    pinned: bool = False
    on_device: dict[torch.dtype, torch.Tensor] | None = None
    fetches: int = 0
    _undo: list[Callable[[], None]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """GPU bytes the model takes while fetched."""
        return sum(flat.nbytes for flat in self.host.values())

    @property
    def fetched(self) -> bool:
        return self.on_device is not None

    def fetch(self) -> None:
        """Copy the weights to the device (once until the next ``park``)."""
        if self.on_device is not None:
            return
        flats = {dtype: torch.empty_like(host, device=self.device)  # all before any copy
                 for dtype, host in self.host.items()}
        for dtype, flat in flats.items():
            flat.copy_(self.host[dtype], non_blocking=self.pinned)
        self._point(flats)
        self.on_device = flats
        self.fetches += 1

    def park(self) -> None:
        """Back to the host views; the GPU buffers return to the allocator (stream-ordered,
        so kernels still reading them finish first)."""
        if self.on_device is None:
            return
        self._point(self.host)
        self.on_device = None

    def close(self) -> None:
        """Park, remove the hooks and unlock the host pages (the weights stay, pageable)."""
        self.park()
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if self.pinned:
            torch.cuda.synchronize(self.device)  # a fetch's copy may still read the pages
            for host in self.host.values():
                unregister_host(host)
            self.pinned = False

    def _point(self, flats: dict[torch.dtype, torch.Tensor]) -> None:
        for dtype, slots in self.slots.items():
            flat = flats[dtype]
            for s in slots:
                s.tensor.data = flat[s.offset:s.offset + s.shape.numel()].view(s.shape)


def _aligned(numel: int, dtype: torch.dtype) -> int:
    per = max(1, ALIGN_BYTES // dtype.itemsize)
    return (numel + per - 1) // per * per


def park_tensors(tensors: Iterable[torch.Tensor], device: str | torch.device) -> ParkedModel:
    """Pack ``tensors`` (parameters or buffers, wherever they are now) into host memory and
    point them there. A tensor listed twice (tied weights) is packed once."""
    device = torch.device(device)
    unique: dict[int, torch.Tensor] = {}
    for t in tensors:
        unique.setdefault(id(t), t)
    slots: dict[torch.dtype, list[_Slot]] = {}
    sizes: dict[torch.dtype, int] = {}
    for t in unique.values():
        offset = sizes.get(t.dtype, 0)
        slots.setdefault(t.dtype, []).append(_Slot(t, offset, t.shape))
        sizes[t.dtype] = offset + _aligned(t.numel(), t.dtype)
    host = {dtype: torch.empty(n, dtype=dtype, device="cpu") for dtype, n in sizes.items()}
    for dtype, group in slots.items():
        for s in group:
            host[dtype][s.offset:s.offset + s.shape.numel()].copy_(s.tensor.data.reshape(-1))
    parked = ParkedModel(device, slots, host)
    parked._point(host)  # the original storage (GPU or host) is freed here
    if device.type == "cuda":
        locked = [h for h in host.values() if register_host(h)]
        parked.pinned = len(locked) == len(host)
        if not parked.pinned:  # all or nothing, so fetch's non_blocking is always safe
            for h in locked:
                unregister_host(h)
    return parked


def park_module(module: torch.nn.Module, device: str | torch.device,
                tensors: Iterable[torch.Tensor] | None = None) -> ParkedModel:
    """Park ``module``'s tensors (all its parameters and buffers unless ``tensors`` names
    some), fetch them before each call, and park them at diffsynth's phase changes. An
    ``offload`` the module already has (a block streamer's) still runs first."""
    if tensors is None:
        tensors = [*module.parameters(), *module.buffers()]
    parked = park_tensors(tensors, device)
    hook = module.register_forward_pre_hook(lambda _module, _args: parked.fetch())
    saved: dict[str, Any] = {name: module.__dict__[name] for name in (
        "vram_management_enabled", "offload", "onload") if name in module.__dict__}
    previous = saved.get("offload")

    def offload() -> None:
        if previous is not None:
            previous()
        parked.park()

    module.vram_management_enabled = True  # type: ignore[assignment]
    module.offload = offload  # type: ignore[assignment]
    module.onload = saved.get("onload", _nothing)  # type: ignore[assignment]

    def undo() -> None:
        hook.remove()
        for name in ("vram_management_enabled", "offload", "onload"):
            module.__dict__.pop(name, None)
        module.__dict__.update(saved)

    parked._undo.append(undo)
    return parked


def _nothing() -> None:
    return None
