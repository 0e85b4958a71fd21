"""From a ``MemoryPlan`` and the model paths to a diffsynth ``FluxImagePipeline``.

``pipeline_kwargs`` is exactly what ``FluxImagePipeline.from_pretrained`` receives, built without
loading any weight, so the tests can check each preset's ``ModelConfig``s and ``vram_limit``.
``load_pipeline`` loads it and starts the block streamers the plan asks for, in the order that
keeps the host's peak memory lowest (``host_memory.py`` keeps each load near the weights' size).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffsynth.core import ModelConfig

from engine.flux.host_memory import frugal_loading
from engine.flux.model_files import ModelPaths
from engine.flux.parking import ParkedModel
from engine.flux.presets import MemoryPlan, Placement
from engine.flux.residency import OtherWeights

# diffsynth's VRAM management calls torch.<device>.empty_cache() between phases; a CPU-only
# torch has no torch.cpu.empty_cache (there is no CPU cache to empty), so give it a no-op.
if not hasattr(torch.cpu, "empty_cache"):
    torch.cpu.empty_cache = lambda: None  # type: ignore[attr-defined]

_DTYPES = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn,
           "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else _DTYPES[name]


def vram_kwargs(placement: Placement) -> dict[str, Any]:
    """ModelConfig's offload/onload/preparing/computation fields, with torch dtypes."""
    if not placement.managed:  # unmanaged: diffsynth loads it onto the computation device
        return {"computation_device": placement.computation_device,
                "computation_dtype": torch_dtype(placement.computation_dtype)}
    return {key: (torch_dtype(value) if key.endswith("_dtype") else value)
            for key, value in placement.vram_config().items()}


def model_configs(plan: MemoryPlan, paths: ModelPaths) -> list[ModelConfig]:
    """One ModelConfig per file, with a local path so diffsynth never downloads."""
    files = [(paths.dit, plan.dit), (paths.text_encoder, plan.clip),
             (paths.text_encoder_2, plan.t5), (paths.vae, plan.vae)]
    return [ModelConfig(path=path, skip_download=True, **vram_kwargs(placement))
            for path, placement in files]


def pipeline_kwargs(plan: MemoryPlan, paths: ModelPaths) -> dict[str, Any]:
    return {
        "torch_dtype": torch.bfloat16,
        "device": plan.device,
        "model_configs": model_configs(plan, paths),
        "tokenizer_1_config": ModelConfig(path=paths.tokenizer, skip_download=True),
        "tokenizer_2_config": ModelConfig(path=paths.tokenizer_2, skip_download=True),
        "vram_limit": plan.vram_limit_gib,
    }


def build_pipeline(plan: MemoryPlan, paths: ModelPaths) -> Any:
    """Load the weights (blocking: seconds to minutes) and return the pipeline."""
    from diffsynth.pipelines.flux_image import FluxImagePipeline

    with frugal_loading():
        pipe = FluxImagePipeline.from_pretrained(**pipeline_kwargs(plan, paths))
    share_t5_embedding(pipe.text_encoder_2)
    return pipe


def share_t5_embedding(t5: Any) -> bool:
    """Make T5's two input embeddings one again. transformers ties ``encoder.embed_tokens`` to
    ``shared``, but diffsynth's converter hands each its own copy of ``shared.weight`` and
    ``load_state_dict(assign=True)`` keeps both: 0.5 GiB of bf16 (the unused one in ``shared``)
    on the GPU when T5 is resident or streamed, 0.25 GiB in float8 on the host. Only for plain,
    equal embeddings (not under diffsynth's VRAM layers). True when it shared them."""
    shared = getattr(t5, "shared", None)
    inner = getattr(getattr(t5, "encoder", None), "embed_tokens", None)
    if not (isinstance(shared, torch.nn.Embedding) and isinstance(inner, torch.nn.Embedding)):
        return False
    a, b = shared.weight, inner.weight
    if a is b or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if not torch.equal(a.detach().contiguous().view(torch.uint8),
                       b.detach().contiguous().view(torch.uint8)):
        return False
    inner.weight = a
    return True


def set_vram_limit(pipe: Any, limit_gib: float | None) -> int:
    """Change the limit on every managed layer in place; returns how many layers were changed."""
    from diffsynth.core.vram.layers import AutoTorchModule

    changed = 0
    for module in pipe.modules():
        if isinstance(module, AutoTorchModule):
            module.vram_limit = limit_gib
            changed += 1
    return changed


def step_reporter(on_step: Callable[[int, int], None],
                  sync: Callable[[], None] | None = None,
                  ) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """A stand-in for diffsynth's ``progress_bar_cmd``: it wraps the timestep loop, and when the
    loop asks for the next timestep (the previous step is done) it calls ``on_step(i, n)``.
    ``sync`` waits for the GPU first, so step times and cancellation are honest. An exception
    raised by ``on_step`` leaves the sampling loop."""

    def progress(timesteps: Iterable[Any]) -> Iterator[Any]:
        items = list(timesteps)
        for i, item in enumerate(items, start=1):
            yield item
            if sync is not None:
                sync()
            on_step(i, len(items))

    return progress


T5_BLOCKS = ("encoder.block",)  # transformers' T5EncoderModel, which diffsynth's T5 encoder is


def start_t5_streaming(pipe: Any, plan: MemoryPlan) -> Any:
    """Stream every T5 block (float8 in page-locked host memory) through two staging slots.

    T5 runs once per image, so nothing of it needs to stay resident: its 4.7 GB cross PCIe in
    about a tenth of a second, where diffsynth's per-layer copy took about 5 s. Its buffers are
    released while the DiT runs (diffsynth's phase change calls ``offload``).
    """
    from engine.flux.residency import STREAMED, ResidencyPlan
    from engine.flux.streaming import enable_block_streaming, measure_blocks

    t5 = pipe.text_encoder_2
    sizes, fixed = measure_blocks(t5, block_lists=T5_BLOCKS)
    residency = ResidencyPlan(placements=(STREAMED,) * len(sizes), block_bytes=tuple(sizes),
                              budget_bytes=2**62, reserve_bytes=0, fixed_bytes=fixed, slots=2)
    handle = enable_block_streaming(t5, residency, plan.device, block_lists=T5_BLOCKS)
    handle.follow_pipeline_phases()
    handle.release_buffers()
    # diffsynth only calls offload()/onload() at phase changes when the pipeline says some model
    # is managed; in balanced nothing else is (CLIP and the VAE are plain resident modules)
    pipe.vram_management_enabled = True
    return handle


def start_dit_streaming(pipe: Any, plan: MemoryPlan, others: OtherWeights | None = None) -> Any:
    """Lay the CPU float8 DiT out for block streaming within the plan's budget.

    The budget is what the plan allows the whole pipeline, less what the other models will
    keep on the GPU (``others``: in every phase, or in their own phases when parked) and what
    is already allocated there; see ``dit_residency``. Returns the ``StreamingHandle``
    (``close()`` it before dropping the pipeline); a re-plan moves its blocks with
    ``handle.relayout(residency.dit_residency(..., handle.others))``.
    """
    from engine.flux.residency import dit_residency
    from engine.flux.streaming import enable_block_streaming, largest_casts_bytes, measure_blocks

    device = torch.device(plan.device)
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    others = dataclasses.replace(others or OtherWeights(parked=False), resident=allocated)
    sizes, fixed = measure_blocks(pipe.dit)
    casts = largest_casts_bytes(pipe.dit) if plan.layer_cast else 0
    residency = dit_residency(plan, sizes, fixed, others, casts)
    # the layers cast their own float8 weights: no work buffer of a whole block (streaming.py)
    handle = enable_block_streaming(pipe.dit, residency, plan.device, layer_cast=plan.layer_cast)
    handle.others = others  # what a re-plan keeps aside for the other models
    if getattr(pipe, "vram_management_enabled", False):
        handle.follow_pipeline_phases()  # release the buffers for the text encoders and VAE
    return handle


@dataclass
class LoadedPipeline:
    pipe: Any
    dit_stream: Any = None  # StreamingHandle when the plan block-streams the DiT
    t5_stream: Any = None  # and when it block-streams T5
    parked: list[ParkedModel] = field(default_factory=list)  # CLIP, the VAE, T5's embedding

    def close(self) -> None:
        """Unhook and unlock everything page-locked (parked models first: T5's wraps its
        streamer's phase hook)."""
        for parked in self.parked:
            parked.close()
        self.parked.clear()
        for handle in (self.t5_stream, self.dit_stream):
            if handle is not None:
                handle.close()


# diffsynth's model names (configs/model_configs.py) -> the FluxImagePipeline attributes its
# from_pretrained fetches them into
_FETCH = {"flux_text_encoder_clip": "text_encoder_1", "flux_text_encoder_t5": "text_encoder_2",
          "flux_vae_encoder": "vae_encoder", "flux_vae_decoder": "vae_decoder"}


def load_pipeline(plan: MemoryPlan, paths: ModelPaths) -> LoadedPipeline:
    """``build_pipeline`` and the block streamers the plan asks for.

    A streaming plan loads the DiT alone first and lays it out at once, so the blocks that go
    to the GPU leave the host before T5 (4.4 GiB in float8) arrives: the host never holds the
    whole DiT (11.1 GiB) and T5 together. What the later models will keep on the GPU is
    reserved from the DiT's budget ahead (``other_weights``), so the DiT gets the layout
    it got when it was laid out last. T5, CLIP and the VAE are then loaded by diffsynth's own
    ``ModelPool``, one file at a time, so the second copy of CLIP that diffsynth's detection
    loads (its file also matches the Stable Diffusion text encoder) is dropped at once.
    """
    if not plan.streaming:
        return LoadedPipeline(build_pipeline(plan, paths))
    from diffsynth.pipelines.flux_image import FluxImagePipeline

    kwargs = pipeline_kwargs(plan, paths)
    dit, clip, t5, vae = kwargs.pop("model_configs")
    with frugal_loading():
        pipe = FluxImagePipeline.from_pretrained(model_configs=[dit], **kwargs)
    stream = start_dit_streaming(pipe, plan, other_weights(plan, paths))
    stream.release_buffers()  # allocated again by the first denoising step
    loaded = LoadedPipeline(pipe, stream)
    try:
        for config in (t5, clip, vae):
            _load_into(pipe, config, plan.vram_limit_gib)
            if config is t5:
                share_t5_embedding(pipe.text_encoder_2)
            if config is t5 and plan.stream_t5:
                loaded.t5_stream = start_t5_streaming(pipe, plan)
        if plan.park_models:
            park_other_models(pipe, plan.device, loaded.t5_stream, into=loaded.parked)
    except BaseException:
        loaded.close()  # unregister the page-locked memory
        raise
    # diffsynth's phase changes (text encoders -> DiT -> VAE) release the streamers' buffers
    # and park the other models; it makes them only when the pipeline says so
    # (start_t5_streaming has said it already)
    pipe.vram_management_enabled = True
    stream.follow_pipeline_phases()
    return loaded


def park_other_models(pipe: Any, device: str, t5_stream: Any = None,
                      into: list[ParkedModel] | None = None) -> list[ParkedModel]:
    """Park CLIP, the VAE encoder and decoder, and block-streamed T5's non-block weights (its
    embedding and norms; ``t5_stream`` is its streamer) in host memory: each comes to the GPU
    when it runs and leaves at the next phase change, so the denoising loop has their room
    (engine/flux/parking.py). Models under diffsynth's own VRAM management are left to it.
    Each parked model is appended to ``into`` as soon as it is parked, so a failure part-way
    leaves the caller every one to close."""
    from engine.flux.parking import park_module

    parked = [] if into is None else into
    for name in ("text_encoder_1", "vae_encoder", "vae_decoder"):
        module = getattr(pipe, name, None)
        if module is not None and not getattr(module, "vram_management_enabled", False):
            parked.append(park_module(module, device))
    t5 = getattr(pipe, "text_encoder_2", None)
    if t5 is not None and t5_stream is not None:
        streamed = {id(p) for p in t5_stream.packed_parameters()}
        rest = [p for p in t5.parameters() if id(p) not in streamed]
        parked.append(park_module(t5, device, [*rest, *t5.buffers()]))
    return parked


def _load_into(pipe: Any, config: ModelConfig, vram_limit: float | None) -> None:
    """Load one file with diffsynth's ModelPool into the pipeline's attributes, as its
    from_pretrained does; models of the file that the pipeline does not use are dropped."""
    with frugal_loading():
        pool = pipe.download_and_load_models([config], vram_limit)
        for name, attribute in _FETCH.items():
            if name in pool.model_name:
                setattr(pipe, attribute, pool.model[pool.model_name.index(name)])
        del pool


def other_weights(plan: MemoryPlan, paths: ModelPaths) -> OtherWeights:
    """GPU bytes of CLIP, T5 and the VAE under ``plan``, from the files' headers, by phase:
    T5's non-block weights when it is block-streamed (what ``measure_blocks`` calls fixed, in
    bf16) and every model resident on the GPU, in its compute dtype. In a streaming plan they
    are parked (``park_other_models``): each is on the GPU in its own phase only."""
    from diffsynth.core.loader.file import load_keys_dict

    def nbytes(shapes: dict[str, Any], placement: Placement, prefix: str = "") -> int:
        if placement.managed or placement.computation_device == "cpu":
            return 0
        item = _DTYPES[placement.computation_dtype].itemsize
        return item * sum(math.prod(s) for key, s in shapes.items() if key.startswith(prefix))

    text = nbytes(load_keys_dict(paths.text_encoder), plan.clip)
    if plan.stream_t5:
        shapes = load_keys_dict(list(paths.text_encoder_2))
        text += 2 * sum(math.prod(shape) for key, shape in shapes.items()
                        if not (key.startswith("encoder.block.") and len(shape) >= 2))
    vae = load_keys_dict(paths.vae)
    return OtherWeights(text=text, encode=nbytes(vae, plan.vae, "encoder."),
                        decode=nbytes(vae, plan.vae, "decoder."),
                        parked=plan.streaming and plan.park_models)


def compile_dit_blocks(dit: Any, mode: str | None = None) -> int:
    """Compile each DiT block type's forward once and bind it to every block of that type
    (regional compilation: two graphs, seconds instead of minutes). Module hooks, such as the
    streamer's, stay outside the compiled code. torch's automatic dynamic shapes: the first
    image size gets static graphs, a second size dynamic ones that serve every other size.
    ``mode`` is torch.compile's (None: its default). Returns how many blocks were compiled;
    ``uncompile_dit_blocks`` undoes it."""
    import types

    from engine.flux.streaming import dit_blocks

    # one block type's forward serves every block of it: its graphs (sizes, passes, with and
    # without a style) share dynamo's per-function limit, whose default of 8 a few styles'
    # sets of layers could reach, after which the rest would run eager without a word
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    # With model.layer_cast a re-plan moves blocks between bf16 and float8 by assigning
    # ``p.data``, which leaves the module's dicts as they were. Dynamo skips the tensor guards
    # (dtype included) of a module whose dicts did not change, so torch 2.11 ran the other
    # dtype's graph: "self and mat2 must have the same dtype" on CUDA, wrong values on the CPU
    # (tests/test_compiled_relayout.py). Checking those guards costs microseconds per block.
    if hasattr(torch._dynamo.config, "skip_tensor_guards_with_matching_dict_tags"):
        torch._dynamo.config.skip_tensor_guards_with_matching_dict_tags = False
    compiled = {}
    blocks = dit_blocks(dit)
    for block in blocks:
        kind = type(block)
        if kind not in compiled:
            compiled[kind] = torch.compile(kind.forward, mode=mode)
        block.forward = types.MethodType(compiled[kind], block)
    return len(blocks)


def uncompile_dit_blocks(dit: Any) -> None:
    from engine.flux.streaming import dit_blocks

    for block in dit_blocks(dit):
        block.__dict__.pop("forward", None)  # back to the class's eager forward
