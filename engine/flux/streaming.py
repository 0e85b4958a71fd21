"""Carry out a ``ResidencyPlan`` on a DiT: float8 blocks streamed from pinned host memory.

    sizes, fixed = measure_blocks(dit)                      # dit on the CPU, float8 or bf16
    plan = plan_residency(sizes, budget, activation_reserve_bytes(1024, 1024), fixed_bytes=fixed)
    handle = enable_block_streaming(dit, plan, "cuda")      # once; weights stay put afterwards
    ... run the pipeline (diffsynth's model_fn calls each block as a module) ...
    handle.relayout(tighter_plan)                           # after an OOM: blocks move, no reload
    handle.stats()["bytes_streamed_per_pass"]; handle.close()  # back to a CPU module

Why not diffsynth's VRAM layers: a layer left on the CPU is cast to bf16 on the CPU and copied
from pageable memory on the compute stream, synchronously, per call (~1 GB/s of weights). Here
every block is moved as one contiguous float8 buffer from page-locked memory on a side CUDA
stream while the previous block computes (the copy engine runs at PCIe speed, ~55 GB/s on an
H100), then cast to bf16 on the GPU in one kernel.

Memory layout (made once; nothing is allocated per call):
- a block's weight matrices (2-D parameters) are packed into one flat float8 buffer of its own:
  on the GPU for ``fp8`` blocks, page-locked host memory for ``streamed`` blocks; each block's
  original weights are freed as soon as it is packed (and glibc's free heap pages given back),
  so the host holds each weight once. One buffer a block lets ``relayout`` move single blocks
  between the GPU and the host: a tighter plan after an out-of-memory error adds to the host
  only the blocks it sends there, never a second copy of the DiT;
- every ``fp8``/``streamed`` block's weight parameters are views into ONE shared bf16 work
  buffer; a forward pre-hook casts the block's float8 bytes into it just before it runs (only
  one block computes at a time, so they can share it);
- ``slots`` float8 staging buffers on the GPU receive the copies, round robin, in the cyclic
  order of the streamed blocks, so the first blocks of the next pass (or the next image) are
  already on their way when a pass ends;
- biases and norm scales (1-D) stay on the GPU in bf16; ``bf16`` blocks are plain resident.

Ordering: the compute stream waits for a slot's ``copied`` event before its cast; the side
stream waits for the slot's ``free`` event (recorded after that cast) before reusing it.

``layer_cast`` (the DiT's mode with ``model.layer_cast``): there is no work buffer. Each
block's ``nn.Linear`` layers become ``CastLinear``, whose forward casts its own float8 weight to
bf16 just before its matmul (inside the compiled graph, so the bf16 copy of one layer lives
only as long as that matmul), and the block's weights are views of its float8 buffer: its own on
the GPU (``fp8``) or the staging slot it was copied into (``streamed``, repointed at each call).
The GPU then holds the largest layers' bf16 weights at a time (226 MB for FLUX.1-dev) instead of
the largest block's (680 MB), and that difference keeps DiT blocks resident. The slot is read
during the whole block, so its ``free`` event is recorded after the block (a forward hook), not
after a cast.

Failure: an exception in any block (out of memory, a cancelled job) can leave a pass half done.
The state stays usable: the work buffer and the slots are made all at once or not at all, a
block called out of the expected order restarts the prefetch there, and ``release_buffers``
(which the backend calls after every failed pass) waits for copies in flight and drops them.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from engine.flux.host_memory import release_free_heap
from engine.flux.page_lock import register_host, unregister_host
from engine.flux.residency import BF16, FP8, STREAMED, ResidencyPlan

log = logging.getLogger(__name__)
ALIGN = 256  # elements: every packed weight starts 256-byte (fp8) / 512-byte (bf16) aligned
BLOCK_LISTS = ("blocks", "single_blocks")  # diffsynth FluxDiT, in execution order


def dit_blocks(dit: torch.nn.Module, names: Iterable[str] = BLOCK_LISTS) -> list[torch.nn.Module]:
    """The transformer blocks in the order the model function calls them."""
    blocks: list[torch.nn.Module] = []
    for name in names:
        owner: Any = dit
        for part in name.split("."):  # dotted: "encoder.block" for T5
            owner = getattr(owner, part, None)
        blocks.extend(owner or [])
    if not blocks:
        raise ValueError(f"{type(dit).__name__} has none of the block lists {tuple(names)}")
    return blocks


def _is_packed(param: torch.Tensor) -> bool:
    return param.dim() >= 2  # weight matrices; biases and norm scales stay bf16-resident


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def measure_blocks(dit: torch.nn.Module, storage_dtype: torch.dtype = torch.float8_e4m3fn,
                   compute_dtype: torch.dtype = torch.bfloat16,
                   block_lists: Iterable[str] = BLOCK_LISTS) -> tuple[list[int], int]:
    """(storage bytes of each block's packed weights, bytes of everything kept resident in
    the compute dtype: non-block weights plus every block's biases and norm scales)."""
    _refuse_managed(dit)
    blocks = dit_blocks(dit, block_lists)
    item_s, item_c = storage_dtype.itemsize, compute_dtype.itemsize
    sizes = [sum(_aligned(p.numel()) for p in b.parameters() if _is_packed(p)) * item_s
             for b in blocks]
    in_blocks = {id(p) for b in blocks for p in b.parameters() if _is_packed(p)}
    fixed = sum(p.numel() * item_c for p in dit.parameters() if id(p) not in in_blocks)
    return sizes, fixed


def largest_casts_bytes(dit: torch.nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                        block_lists: Iterable[str] = BLOCK_LISTS) -> int:
    """What ``layer_cast`` blocks hold in cast weights at once, budgeted as the two largest
    weight matrices of a block in the compute dtype (the compiler may cast the next layer's
    weight before the last matmul ends)."""
    most = 0
    for block in dit_blocks(dit, block_lists):
        sizes = sorted((p.numel() for p in block.parameters() if _is_packed(p)), reverse=True)
        most = max(most, sum(sizes[:2]) * compute_dtype.itemsize)
    return most


def _refuse_managed(dit: torch.nn.Module) -> None:
    """diffsynth's VRAM layers move weights themselves; both managing one DiT would clash."""
    if getattr(dit, "vram_management_enabled", False):
        raise ValueError(
            "this DiT is under diffsynth's VRAM management; load it unmanaged on the CPU "
            "(ModelConfig(path=..., computation_device='cpu', "
            "computation_dtype=torch.float8_e4m3fn)) before enabling block streaming")


@dataclass
class _Block:
    index: int
    placement: str
    params: list[tuple[torch.nn.Parameter, int, torch.Size]]  # packed weight, offset, shape
    numel: int  # packed elements, aligned
    source: torch.Tensor | None = None  # float8 flat: GPU (fp8) or page-locked host (streamed)
    pinned: bool = False  # source registered with cudaHostRegister
    slot: int = -1  # layer_cast: the staging slot a streamed block's weights view now


class CastLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose weight may be stored in float8: cast to the input's dtype for
    each matmul (a no-op for a bf16 weight). ``layer_cast`` streaming gives the DiT's block
    layers this class in place (``__class__``), so hooks and names are untouched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


class StreamingHandle:
    """The live streaming state of one DiT; ``close()`` puts the DiT back on the CPU."""

    def __init__(self, dit: torch.nn.Module, plan: ResidencyPlan, device: torch.device,
                 compute_dtype: torch.dtype, storage_dtype: torch.dtype,
                 cast: str = "auto", block_lists: Iterable[str] = BLOCK_LISTS,
                 layer_cast: bool = False) -> None:
        self.dit, self.plan, self.device = dit, plan, device
        self.block_lists = tuple(block_lists)
        self.layer_cast = layer_cast
        self._cast_linears: list[torch.nn.Module] = []  # nn.Linear again at close
        self.compute_dtype, self.storage_dtype = compute_dtype, storage_dtype
        self._cast_fn = _make_cast(cast, device)
        self._cuda = device.type == "cuda"
        self._blocks: list[_Block] = []
        self._hooks: list[Any] = []
        self._work: torch.Tensor | None = None
        self._slots: list[torch.Tensor] = []
        self._copied: list[Any] = []
        self._free: list[Any] = []
        self._side: Any = None
        self._order: list[int] = []  # streamed block indices, execution order
        self._issued: deque[tuple[int, int]] = deque()  # (block index, slot) copied or on the way
        self._next_pos = 0  # position in _order of the next block to issue
        self._next_slot = 0
        self.others: Any = None  # residency.OtherWeights: kept aside by re-plans
        self.passes = 0
        self.bytes_streamed = 0
        self.restarts = 0  # times the call order differed from the prefetch order
        self.releases = 0

    # -- set-up ----------------------------------------------------------------------------
    def _setup(self) -> None:
        blocks = dit_blocks(self.dit, self.block_lists)
        if len(blocks) != len(self.plan.placements):
            raise ValueError(f"the plan has {len(self.plan.placements)} placements but the DiT "
                             f"has {len(blocks)} blocks")
        if self.layer_cast:
            self._cast_layers(blocks)
        self._move_fixed(blocks)
        self._blocks = [self._describe(i, b) for i, b in enumerate(blocks)]
        try:
            for block in self._blocks:  # from the CPU module: params hold the float8 weights
                self._place_from_cpu(block)
            self._order = self._streamed_order()
            self._make_buffers()
        except BaseException:
            for block in self._blocks:  # page-locked memory must not outlive a failed set-up
                self._unpin(block)
            self._uncast_layers()
            raise
        if not self.layer_cast:
            self._warm_cast()
        for block, module in zip(self._blocks, blocks, strict=True):
            self._hooks.append(module.register_forward_pre_hook(self._pre_hook(block)))
            if self.layer_cast:  # a relayout may stream any block later; runs after a raise too
                self._hooks.append(module.register_forward_hook(self._post_hook(block),
                                                                always_call=True))

    def _cast_layers(self, blocks: list[torch.nn.Module]) -> None:
        """Give every linear layer of the blocks ``CastLinear``'s forward; refuse a block with
        a weight matrix outside an ``nn.Linear`` (it could not cast itself)."""
        linears = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
        in_linear = {id(m.weight) for m in linears}
        for b in blocks:
            for name, p in b.named_parameters():
                if _is_packed(p) and id(p) not in in_linear:
                    raise ValueError(f"layer_cast streaming needs every weight matrix in an "
                                     f"nn.Linear; {type(b).__name__}.{name} is not")
        for m in linears:
            if type(m) is torch.nn.Linear:
                self._cast_linears.append(m)
                m.__class__ = CastLinear

    def _uncast_layers(self) -> None:
        for module in self._cast_linears:
            module.__class__ = torch.nn.Linear
        self._cast_linears.clear()

    def _move_fixed(self, blocks: list[torch.nn.Module]) -> None:
        """Non-block weights and the blocks' 1-D parameters: resident in the compute dtype."""
        packed = {id(p) for b in blocks for p in b.parameters() if _is_packed(p)}
        for p in self.dit.parameters():
            if id(p) not in packed:
                p.data = p.data.to(self.device, self.compute_dtype)
        for b in self.dit.buffers():
            b.data = b.data.to(self.device)

    def _describe(self, index: int, module: torch.nn.Module) -> _Block:
        params, offset = [], 0
        for p in module.parameters():
            if _is_packed(p):
                params.append((p, offset, p.shape))
                offset += _aligned(p.numel())
        return _Block(index, self.plan.placements[index], params, offset)

    def _pack(self, block: _Block, flat: torch.Tensor) -> None:
        for p, off, _ in block.params:
            flat[off:off + p.numel()].copy_(p.data.reshape(-1))
        block.source = flat

    def _place_from_cpu(self, block: _Block) -> None:
        """Lay one block out from the CPU module's float8 weights (at set-up)."""
        if block.placement == BF16:
            for p, _, _ in block.params:
                p.data = p.data.to(self.device, self.compute_dtype)
            return
        self._pack_anew(block, on_gpu=block.placement == FP8)
        release_free_heap()  # so the buffer's pages replace the weights', not add to them
        if block.placement == STREAMED:
            self._pin(block)

    def _pack_anew(self, block: _Block, *, on_gpu: bool) -> None:
        """Pack the block's weights (wherever they are) into a new float8 buffer of its own,
        on the GPU or in host memory, and let the weights go."""
        flat = torch.empty(block.numel, dtype=self.storage_dtype,
                           device=self.device if on_gpu else "cpu")
        self._pack(block, flat)
        self._release(block)

    def _pin(self, block: _Block) -> None:
        assert block.source is not None
        block.pinned = self._cuda and register_host(block.source)

    def _unpin(self, block: _Block) -> None:
        if block.pinned and block.source is not None:
            unregister_host(block.source)
        block.pinned = False

    @property
    def _pinned(self) -> bool:
        """Some streamed block is page-locked."""
        return any(b.pinned for b in self._blocks)

    def _streamed_order(self) -> list[int]:
        return [b.index for b in self._blocks if b.placement == STREAMED]

    def _release(self, block: _Block) -> None:
        """Point the block's weights at nothing (freeing their CPU storage) until
        ``_make_buffers`` points them into the work buffer (or, with ``layer_cast``,
        ``_point`` at their float8 buffer)."""
        dtype = self.storage_dtype if self.layer_cast else self.compute_dtype
        for p, _, _ in block.params:
            p.data = torch.empty(0, dtype=dtype, device=self.device)

    def _point(self, block: _Block, flat: torch.Tensor) -> None:
        """The block's weights become views of ``flat``: the work buffer, or with
        ``layer_cast`` its float8 buffer or a staging slot."""
        for p, off, shape in block.params:
            p.data = flat[off:off + shape.numel()].view(shape)

    def _point_resident(self) -> None:
        """``layer_cast``: every fp8 block's weights view its own GPU buffer (always)."""
        for b in self._blocks:
            if b.placement == FP8:
                assert b.source is not None
                self._point(b, b.source)

    def _make_buffers(self) -> None:
        """Allocate the work buffer and the staging slots and point the cast blocks' weights
        into the work buffer (at set-up, and again after ``release_buffers``). All or nothing:
        an out-of-memory error on the last slot leaves no half-made state behind."""
        cast = [b for b in self._blocks if b.placement != BF16]
        if not cast:
            return
        work = None if self.layer_cast else torch.empty(
            max(b.numel for b in cast), dtype=self.compute_dtype, device=self.device)
        slots: list[torch.Tensor] = []
        if self._order:
            size = max(self._blocks[i].numel for i in self._order)
            slots = [torch.empty(size, dtype=self.storage_dtype, device=self.device)
                     for _ in range(self.plan.slots)]
        if slots and len(self._copied) != len(slots):
            self._copied = [self._event() for _ in slots]
            self._free = [self._event() for _ in slots]
        if slots and self._side is None and self._cuda:
            self._side = torch.cuda.Stream(self.device)
        if slots and self._cuda:
            # the slots' memory may just have been freed by kernels still queued on the compute
            # stream (a parked model, the other streamer's slots): copies into them wait
            self._side.wait_stream(torch.cuda.current_stream(self.device))
        if work is not None:
            for b in cast:
                self._point(b, work)
        else:
            self._point_resident()
        self._work, self._slots = work, slots
        self._issued.clear()
        self._next_slot = 0

    @property
    def _ready(self) -> bool:
        if self.layer_cast:
            return bool(self._slots) or not self._order
        return self._work is not None and (bool(self._slots) or not self._order)

    def _warm_cast(self) -> None:
        """Compile the cast for each block size now (start-up), not in the first user's step;
        fall back to the plain copy where compilation fails (no Triton, no C compiler)."""
        if self._cast_fn is _copy_cast:
            return
        done: set[int] = set()
        try:
            for b in self._blocks:
                if b.placement == BF16 or b.numel in done:
                    continue
                src = b.source if b.placement == FP8 else self._slots[0]
                self._cast(b, src)
                done.add(b.numel)
        except Exception as e:  # noqa: BLE001 - any compiler failure: use the eager copy
            log.warning("compiled float8 cast unavailable (%s); using the eager copy", e)
            self._cast_fn = _copy_cast

    def _event(self) -> Any:
        return torch.cuda.Event() if self._cuda else None

    # -- per call --------------------------------------------------------------------------
    def _pre_hook(self, block: _Block):  # noqa: ANN202
        first = block.index == 0

        def hook(module: torch.nn.Module, args: Any) -> None:
            if first:
                self.passes += 1
            if block.placement != BF16 and not self._ready:
                self._make_buffers()  # released between denoising loops, or after a failure
            if block.placement == FP8 and not self.layer_cast:
                self._cast(block, block.source)
            elif block.placement == STREAMED:
                self._consume(block)

        return hook

    def _post_hook(self, block: _Block):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if block.slot < 0:
                return
            if self._cuda:  # the next copy into the slot waits for the block's kernels
                self._free[block.slot].record(torch.cuda.current_stream(self.device))
            block.slot = -1
            self._fill()

        return hook

    def _cast(self, block: _Block, flat: torch.Tensor) -> None:
        assert self._work is not None
        self._cast_fn(self._work[:block.numel], flat[:block.numel])  # float8 -> bf16 on the GPU

    def _consume(self, block: _Block) -> None:
        if not self._issued or self._issued[0][0] != block.index:
            self._restart_at(block.index)
        _, slot = self._issued.popleft()
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._copied[slot])
        if self.layer_cast:  # the layers read the slot itself: refilled after the block
            self._point(block, self._slots[slot])
            block.slot = slot
            return
        self._cast(block, self._slots[slot])
        if self._cuda:
            self._free[slot].record(torch.cuda.current_stream(self.device))
        self._fill()

    def _restart_at(self, index: int) -> None:
        """Called out of the expected order (first call, or a skipped block): prefetch
        from here. Earlier copies still land first: the side stream runs in order."""
        self.restarts += 1
        self._issued.clear()
        self._next_pos = self._order.index(index)
        self._fill()

    def _fill(self) -> None:
        while len(self._issued) < min(len(self._slots), len(self._order)):
            index = self._order[self._next_pos]
            self._next_pos = (self._next_pos + 1) % len(self._order)
            slot, self._next_slot = self._next_slot, (self._next_slot + 1) % len(self._slots)
            self._copy(self._blocks[index], slot)
            self._issued.append((index, slot))

    def _copy(self, block: _Block, slot: int) -> None:
        assert block.source is not None
        dst = self._slots[slot][:block.numel]
        if self._cuda:
            with torch.cuda.stream(self._side):
                self._side.wait_event(self._free[slot])
                dst.copy_(block.source, non_blocking=block.pinned)
                self._copied[slot].record(self._side)
        else:
            dst.copy_(block.source)
        self.bytes_streamed += block.numel * dst.element_size()

    # -- between denoising loops -----------------------------------------------------------
    def release_buffers(self) -> None:
        """Free the work buffer and the staging slots, idle outside the denoising loop, so the
        VAE decode and the text encoders can use that memory; the next block call allocates
        them again (and restarts the prefetch). Resident blocks stay resident."""
        if self._work is None and not self._slots and not self._issued:
            return
        if self._cuda and self._side is not None:
            # copies still landing in a slot must finish before its memory is reused
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        for b in self._blocks:
            if b.placement == STREAMED or (b.placement == FP8 and not self.layer_cast):
                self._release(b)
            b.slot = -1
        self._work, self._slots = None, []
        self._issued.clear()
        self._next_slot = 0
        self.releases += 1

    def follow_pipeline_phases(self) -> None:
        """Let diffsynth's phase changes release the buffers: ``load_models_to_device`` calls
        ``offload()`` on a model flagged ``vram_management_enabled`` when another phase (VAE
        decode, text encoders) starts, and ``onload()`` before the denoising loop."""
        self.dit.vram_management_enabled = True
        self.dit.offload = self.release_buffers
        self.dit.onload = _nothing

    # -- reporting and tear-down -----------------------------------------------------------
    def packed_parameters(self) -> list[torch.nn.Parameter]:
        """The block weights this streamer lays out (whatever they view at the moment)."""
        return [p for block in self._blocks for p, _, _ in block.params]

    def stats(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "bytes_streamed": self.bytes_streamed,
            "bytes_streamed_per_pass": self.plan.streamed_bytes,
            "streamed_blocks": len(self._order),
            "fp8_resident_blocks": self.plan.count(FP8),
            "bf16_resident_blocks": self.plan.count(BF16),
            "pinned": self._pinned,
            "restarts": self.restarts,
            "releases": self.releases,
            "host_bytes": sum(b.source.nbytes for b in self._blocks
                              if b.placement == STREAMED and b.source is not None),
        }

    def close(self) -> None:
        """Stop streaming; every weight goes back to the CPU in the storage dtype (packed
        blocks) or the compute dtype (the rest). Idempotent."""
        if not self._hooks:
            return
        if self._cuda:
            torch.cuda.synchronize(self.device)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for name in ("vram_management_enabled", "offload", "onload"):
            self.dit.__dict__.pop(name, None)
        for b in self._blocks:
            self._unpack(b)
        self._uncast_layers()
        for p in self.dit.parameters():
            if p.device != torch.device("cpu"):
                p.data = p.data.cpu()
        self._work, self._slots, self._blocks = None, [], []
        self._issued.clear()

    def _unpack(self, b: _Block) -> None:
        for p, off, shape in b.params:
            if b.placement == BF16:
                p.data = p.data.to("cpu", self.storage_dtype)
            else:  # a host view stays valid (pageable) once unregistered
                assert b.source is not None
                p.data = b.source[off:off + shape.numel()].view(shape).to("cpu")
        self._unpin(b)
        b.source = None

    # -- re-planning -----------------------------------------------------------------------
    def relayout(self, plan: ResidencyPlan) -> None:
        """Move blocks to the placements of ``plan`` (same blocks, another budget) in place.

        Blocks leave the GPU before any arrive, so a tighter plan needs no GPU memory to get
        there, and the host gains only the blocks sent to it. If a move fails, the blocks
        already moved go back and the old plan stays in force (then the error propagates)."""
        if plan.block_bytes != self.plan.block_bytes:
            raise ValueError("relayout needs a plan for the same blocks")
        self.release_buffers()
        if self.layer_cast:  # views of a buffer that moves would keep it alive
            for b in self._blocks:
                if b.placement == FP8:
                    self._release(b)
        moves = [(b, plan.placements[b.index]) for b in self._blocks
                 if b.placement != plan.placements[b.index]]
        # the moves that free the most GPU memory first, those that take the most last
        moves.sort(key=lambda move: _gpu_bytes(move[0], move[1]) - _gpu_bytes(move[0]))
        done: list[tuple[_Block, str]] = []
        try:
            try:
                for block, target in moves:
                    before = block.placement
                    self._move(block, target)
                    done.append((block, before))
            except BaseException:
                for block, before in reversed(done):
                    self._move(block, before)
                raise
            self.plan = plan
        finally:  # whatever happened, the prefetch order matches where the blocks are
            self._order = self._streamed_order()
            self._next_pos = 0
            if self.layer_cast:
                self._point_resident()
        log.info("block streaming re-planned: %s", plan.describe())

    def _move(self, block: _Block, target: str) -> None:
        """One block from its placement to ``target``. Cast blocks' params point at nothing
        here (``release_buffers`` ran); a bf16 block's params hold its GPU weights."""
        if block.placement == BF16:  # exact: the bf16 weights were float8 values
            self._pack_anew(block, on_gpu=target == FP8)
        elif target == BF16:
            assert block.source is not None
            for p, off, shape in block.params:
                p.data = block.source[off:off + shape.numel()].view(shape).to(
                    self.device, self.compute_dtype)
            self._unpin(block)
            block.source = None
        else:  # fp8 <-> streamed: copied first, so a failed copy leaves the block as it was
            assert block.source is not None
            moved = block.source.to(self.device if target == FP8 else "cpu")
            self._unpin(block)
            block.source = moved
        block.placement = target
        if target == STREAMED:
            self._pin(block)
        release_free_heap()

    def __enter__(self) -> StreamingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gpu_bytes(block: _Block, placement: str | None = None) -> int:
    """GPU bytes a block's weights take in a placement (its own by default)."""
    where = placement or block.placement
    return {BF16: 2 * block.numel, FP8: block.numel}.get(where, 0)


def _nothing() -> None:
    return None


def _copy_cast(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def _make_cast(kind: str, device: torch.device | None = None) -> Any:
    """``copy``: PyTorch's elementwise copy kernel (0.97 TB/s read+written for float8 -> bf16
    on an H100: 36 ms per FLUX pass); ``compiled``: the same copy through torch.compile, a
    Triton kernel (1.2-2.3 TB/s in two runs: 15-30 ms); ``auto``: compiled on a CUDA device
    where Triton is installed, else copy."""
    if kind == "auto":
        cuda = device is not None and device.type == "cuda"
        kind = "compiled" if cuda and importlib.util.find_spec("triton") else "copy"
    if kind == "copy":
        return _copy_cast
    if kind == "compiled":
        return torch.compile(_copy_cast, dynamic=False, fullgraph=True)
    raise ValueError(f"cast must be 'auto', 'copy' or 'compiled', got {kind!r}")


def enable_block_streaming(dit: torch.nn.Module, plan: ResidencyPlan,
                           device: str | torch.device = "cuda", *,
                           compute_dtype: torch.dtype = torch.bfloat16,
                           storage_dtype: torch.dtype = torch.float8_e4m3fn,
                           cast: str = "auto",
                           block_lists: Iterable[str] = BLOCK_LISTS,
                           layer_cast: bool = False) -> StreamingHandle:
    """Lay the DiT out as ``plan`` says and hook its blocks (``cast``: see ``_make_cast``;
    ``layer_cast``: see the module docstring; the plan's ``layer_cast_bytes`` should then be
    ``largest_casts_bytes``). The DiT must be on the CPU and unmanaged by diffsynth; afterwards
    its non-block weights are on ``device`` in ``compute_dtype``, and it is called exactly as
    before."""
    _refuse_managed(dit)
    handle = StreamingHandle(dit, plan, torch.device(device), compute_dtype, storage_dtype, cast,
                             block_lists, layer_cast)
    handle._setup()
    log.info("block streaming: %s; host buffer %s", plan.describe(),
             "page-locked" if handle._pinned else "pageable")
    return handle
