"""The FLUX backend: diffsynth's ``FluxImagePipeline`` behind the engine's backend seam.

    backend = FluxBackend(config.model)
    backend.load()                                  # files, memory plan, weights (blocking)
    image = backend.generate(request, on_step)      # on the engine's worker thread
    backend.reduce_memory()                         # after torch.cuda.OutOfMemoryError
    backend.close()

Every method blocks and runs on the engine's one worker thread, except ``memory_info``.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.backends.base import StepCallback
from engine.config import ModelSection
from engine.flux.model_files import Downloader, ModelPaths, ensure_model_files
from engine.flux.presets import GIB, MemoryPlan, plan_memory, tighter
from engine.request import ImageRequest

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

log = logging.getLogger(__name__)
PipelineFactory = Any  # (plan, paths) -> pipeline; replaceable in tests


class FluxBackend:
    def __init__(self, config: ModelSection, *, downloader: Downloader | None = None,
                 pipeline_factory: PipelineFactory | None = None) -> None:
        self.config = config
        self.model_name = f"{_dit_name(config)} (FLUX.1-dev)"
        self.plan: MemoryPlan | None = None
        self.paths: ModelPaths | None = None
        self.load_seconds: float | None = None
        self._downloader = downloader
        self._factory = pipeline_factory
        self._pipe: Any = None
        self._stream: Any = None  # StreamingHandle when the plan block-streams the DiT
        self._t5_stream: Any = None  # and when it block-streams T5
        self.float8: Any = None  # Float8Report when model.float8_compute took effect
        self.compile_seconds: float | None = None  # start-up cost of model.compile

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        import torch

        self._check_device(torch)
        self.paths = ensure_model_files(self.config, self._downloader)
        free, used = _device_memory(torch, self.config.device)
        self.plan = plan_memory(self.config, free, used)
        log.info("FLUX memory plan: %s", self.plan.describe())
        self._build()
        if self.config.float8_compute:
            self._enable_float8()
        if self.config.compile:
            self._compile()

    def _build(self) -> None:
        from engine.flux import pipeline

        assert self.plan is not None and self.paths is not None
        started = time.monotonic()
        if self._factory is None:
            loaded = pipeline.load_pipeline(self.plan, self.paths)
            self._pipe, self._stream, self._t5_stream = (loaded.pipe, loaded.dit_stream,
                                                         loaded.t5_stream)
        else:
            self._pipe = self._factory(self.plan, self.paths)
        self.load_seconds = time.monotonic() - started
        log.info("FLUX pipeline loaded in %.1f s", self.load_seconds)

    def close(self) -> None:
        for handle in (self._stream, self._t5_stream):
            if handle is not None:
                handle.close()  # unregisters the page-locked host memory
        self._stream = self._t5_stream = None
        self._pipe = self.float8 = None
        gc.collect()
        _empty_cache()

    # -- generation ------------------------------------------------------------------------
    def generate(self, request: ImageRequest, on_step: StepCallback) -> Image:
        """Sample one image. Exceptions (``on_step``'s abort, ``torch.cuda.OutOfMemoryError``)
        propagate to the engine."""
        import torch

        from engine.flux.pipeline import step_reporter

        if self._pipe is None or self.plan is None:
            raise RuntimeError("FluxBackend.generate called before load()")
        sync = torch.cuda.synchronize if self.plan.device.startswith("cuda") else None
        return self._pipe(
            prompt=request.prompt,
            seed=request.seed,
            num_inference_steps=request.steps,
            height=request.height,
            width=request.width,
            embedded_guidance=request.guidance,
            cfg_scale=1.0,  # FLUX.1-dev is guidance-distilled: no negative pass
            rand_device="cpu",  # the same seed gives the same image on any GPU
            tiled=self.plan.vae_tiled,
            # diffsynth's default 128-latent tiles fail below 1024 px; 64/32 works at any size
            tile_size=64,
            tile_stride=32,
            progress_bar_cmd=step_reporter(on_step, sync),
        )

    # -- memory ----------------------------------------------------------------------------
    def reduce_memory(self) -> bool:
        """Free cached memory and move to the next tighter plan (reloading when the placement
        of any model changes). False when the plan is already the tightest."""
        if self.plan is None:
            return False
        nxt = tighter(self.plan)
        self._release_activations()
        if nxt is None:
            return False
        log.warning("out of GPU memory; %s", nxt.describe())
        same_layout = nxt.placements == self.plan.placements
        self.plan = nxt
        if same_layout and self._stream is not None and self._factory is None:
            from engine.flux import pipeline

            self._stream.close()  # the DiT goes back to the CPU; lay it out for the new budget
            self._stream = None
            _empty_cache()
            pipeline.set_vram_limit(self._pipe, nxt.vram_limit_gib)
            self._stream = pipeline.start_dit_streaming(self._pipe, nxt)
        elif same_layout and self._pipe is not None and self._factory is None:
            from engine.flux.pipeline import set_vram_limit

            set_vram_limit(self._pipe, nxt.vram_limit_gib)
        else:
            self.close()
            self._build()
        return True

    def _release_activations(self) -> None:
        pipe = self._pipe
        if pipe is not None and getattr(pipe, "vram_management_enabled", False):
            pipe.load_models_to_device([])  # managed layers back to their offload place
        gc.collect()
        _empty_cache()

    def memory_info(self) -> dict[str, float]:
        try:
            import torch
        except ImportError:  # pragma: no cover
            return {}
        if not torch.cuda.is_available() or not self.config.device.startswith("cuda"):
            return {}
        free, total = torch.cuda.mem_get_info(self.config.device)
        return {
            "vram_used_gib": round((total - free) / GIB, 2),
            "vram_total_gib": round(total / GIB, 2),
            "vram_allocated_gib": round(torch.cuda.memory_allocated(self.config.device) / GIB, 2),
            "vram_peak_gib": round(torch.cuda.max_memory_allocated(self.config.device) / GIB, 2),
        }

    # -- helpers ---------------------------------------------------------------------------
    def _check_device(self, torch: Any) -> None:
        if self.config.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(
                f"model.device is {self.config.device!r} but PyTorch sees no CUDA GPU "
                f"(torch {torch.__version__}); install a CUDA build of torch, set "
                'model.device = "cpu" (very slow), or use backend = "dry-run"')

    def _enable_float8(self) -> None:
        """Float8 matmuls for the resident DiT (``max``); elsewhere the DiT is float8-stored and
        streamed or diffsynth-managed, and this is skipped with the reason in the log."""
        from engine.flux.float8_compute import check_float8_matmul, enable_float8_compute

        assert self.plan is not None
        if self.plan.preset != "max":
            log.warning("model.float8_compute needs the max preset (plan: %s); computing in bf16",
                        self.plan.preset)
            return
        reason = check_float8_matmul(self.plan.device)
        if reason is not None:
            log.warning("model.float8_compute ignored: %s; computing in bf16", reason)
            return
        self.float8 = enable_float8_compute(self._pipe.dit)
        _empty_cache()  # the bf16 weights just freed

    def _compile(self) -> None:
        """Regional torch.compile of the DiT blocks (streamed or resident), warmed up before the
        bot says it is ready so that no user waits for the compiler. Where compiling fails (no
        Triton, an old GPU) the blocks go back to eager and the bot still starts."""
        import torch

        from engine.flux.pipeline import compile_dit_blocks, uncompile_dit_blocks

        assert self.plan is not None
        if not self.plan.device.startswith("cuda"):
            log.info("model.compile applies to CUDA devices only; running eager")
            return
        if self._stream is None and self.plan.preset != "max":
            log.warning("model.compile needs DiT streaming or the max preset; running eager")
            return
        started = time.monotonic()
        compile_dit_blocks(self._pipe.dit)
        try:
            # two sizes: the largest image gets its own graphs, the second size the dynamic-shape
            # ones every other size and aspect ratio then uses without compiling again
            for side in (1024, 512):
                warm = ImageRequest(prompt="warm-up", seed=0, steps=2, width=side, height=side,
                                    guidance=3.5)
                self.generate(warm, lambda i, n: None)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager still works
            uncompile_dit_blocks(self._pipe.dit)
            log.warning("torch.compile failed (%s: %s); running eager (slower steps)",
                        type(e).__name__, str(e)[:300])
            return
        self.compile_seconds = time.monotonic() - started
        log.info("compiled and warmed up in %.1f s", self.compile_seconds)


def _dit_name(config: ModelSection) -> str:
    return Path(config.dit_path or config.dit_file).name.removesuffix(".safetensors")


def _device_memory(torch: Any, device: str) -> tuple[float | None, float]:
    """(GiB this process may still allocate, GiB the whole device holds now). A per-process
    memory fraction (``torch.cuda.set_per_process_memory_fraction``) lowers the first."""
    if not device.startswith("cuda"):
        return None, 0.0
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    free, total = torch.cuda.mem_get_info(index)
    fraction = 1.0
    if hasattr(torch.cuda, "get_per_process_memory_fraction"):
        fraction = torch.cuda.get_per_process_memory_fraction(index)
    ours = total * fraction - torch.cuda.memory_reserved(index)
    return max(0.0, min(free, ours)) / GIB, (total - free) / GIB


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
