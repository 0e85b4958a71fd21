"""The FLUX backend: diffsynth's ``FluxImagePipeline`` behind the engine's backend seam.

    backend = FluxBackend(config.model)
    backend.load()                                  # files, memory plan, weights (blocking)
    image = backend.generate(request, on_step)      # on the engine's worker thread
    backend.reduce_memory()                         # after torch.cuda.OutOfMemoryError
    backend.close()

``load`` plans the device budget (``device_budget.py``), loads, then warms up at the largest
image the limits allow and measures the process's real peak on the device: a warm-up that runs
out of memory, or peaks too close to the budget, tightens the plan and warms up again.

Every method blocks and runs on the engine's one worker thread, except ``memory_info`` and
``model_state`` (they only read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.backends.base import ModelState, StepCallback, load_init_image
from engine.config import ModelSection, StyleSection
from engine.errors import N_, GenerationFailed
from engine.flux.batch import batch_sizes, batched, per_batch
from engine.flux.device_budget import calibration_excess_gib, warm_up_side
from engine.flux.model_files import Downloader, ModelPaths, ensure_model_files
from engine.flux.presets import (
    GIB,
    MemoryPlan,
    float8_wanted,
    plan_memory,
    planned_config,
    tighter,
    with_less,
)
from engine.flux.prompt_cache import PromptCache
from engine.flux.vae_tiling import tile_vae
from engine.request import ImageRequest
from engine.upscale import upscale

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

log = logging.getLogger(__name__)
PipelineFactory = Any  # (plan, paths) -> pipeline; replaceable in tests


class FluxBackend:
    def __init__(self, config: ModelSection, *, downloader: Downloader | None = None,
                 pipeline_factory: PipelineFactory | None = None,
                 max_pixels: int = 1024 * 1024, max_images: int = 1,
                 styles: dict[str, StyleSection] | None = None) -> None:
        self.config = config
        self.styles = dict(styles or {})  # [styles]: LoRAs applied per job (engine/flux/lora.py)
        self._loras: dict[str, Any] = {}  # style -> LoraWeights, host memory, read at load()
        self._branches: Any = None  # LoraBranches on the DiT while a pipeline is loaded
        self.max_pixels = max_pixels  # limits.max_pixels: activations are kept for it
        self.max_images = max_images  # limits.images_max: a job's images share one DiT pass
        self.model_name = f"{_dit_name(config)} (FLUX.1-dev)"
        self.plan: MemoryPlan | None = None
        self.paths: ModelPaths | None = None
        self.load_seconds: float | None = None
        self._downloader = downloader
        self._factory = pipeline_factory
        self._loaded: Any = None  # pipeline.LoadedPipeline: the pipeline, its streamers, parked
        self.float8: Any = None  # Float8Report when model.float8_compute took effect
        self._float8_problem: str | None = None  # why this device runs no float8 matmuls
        self.compile_seconds: float | None = None  # start-up cost of model.compile
        self.calibration: list[str] = []  # what each start-up warm-up measured and did
        self._compiled = False
        self.compile_failure: str | None = None  # why model.compile fell back to eager blocks
        self._at_plan: tuple[int, int] | None = None  # (device free, reserved) when planned
        self._built_for: MemoryPlan | None = None  # the plan the pipeline was loaded for
        self.prompts = PromptCache(config.prompt_cache)  # text embeddings, host memory

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        import torch

        self._check_device(torch)
        _prefer_expandable_segments(torch, self.config)
        self.paths = ensure_model_files(self.config, self._downloader)
        lora_gib = self._read_styles()
        free, used = _device_memory(torch, self.config.device)
        self._at_plan = _allocator_snapshot(torch, self.config.device)
        self.plan = plan_memory(self._planning_config(), free, used, self.max_pixels, lora_gib,
                                self.max_images)
        log.info("FLUX memory plan: %s", self.plan.describe())
        self._build()
        self._finish_setup()

    def _planning_config(self) -> ModelSection:
        """The config the plan follows: float8 matmuls (which keep no bf16 copies of DiT blocks)
        only where they are wanted and this device runs them. The probe runs once a load;
        ``_enable_float8`` logs its answer after each build."""
        from engine.flux.float8_compute import check_float8_matmul

        self._float8_problem = None
        if float8_wanted(self.config):
            self._float8_problem = check_float8_matmul(self.config.device)
        return planned_config(self.config, self._float8_problem)

    def _finish_setup(self, calibrate: bool = True) -> None:
        """What follows every build: float8 compute, compile, and the calibrated warm-up."""
        assert self.plan is not None
        if self.config.float8_compute is not False:
            self._enable_float8()
        self._attach_styles()  # after float8 (it replaces layers), before compile
        if self.config.compile:
            self._compile()
        if calibrate and self.plan.device.startswith("cuda"):
            self._calibrate()

    @property
    def _pipe(self) -> Any:
        return None if self._loaded is None else self._loaded.pipe

    @property
    def _stream(self) -> Any:
        """The DiT's StreamingHandle when the plan block-streams it."""
        return None if self._loaded is None else self._loaded.dit_stream

    @property
    def _t5_stream(self) -> Any:
        return None if self._loaded is None else self._loaded.t5_stream

    @property
    def _parked(self) -> list[Any]:
        """ParkedModels: CLIP, the VAE, T5's embedding (streaming with park_models)."""
        return [] if self._loaded is None else self._loaded.parked

    def _build(self) -> None:
        from engine.flux import pipeline

        assert self.plan is not None and self.paths is not None
        started = time.monotonic()
        if self._factory is None:
            self._loaded = pipeline.load_pipeline(self.plan, self.paths)
        else:
            self._loaded = pipeline.LoadedPipeline(self._factory(self.plan, self.paths))
        self.prompts.install(self._pipe)  # emptied: these text encoders may differ
        self._built_for = self.plan
        self.load_seconds = time.monotonic() - started
        log.info("FLUX pipeline loaded in %.1f s", self.load_seconds)

    def close(self) -> None:
        if self._branches is not None:
            self._branches.detach()
            self._branches = None
        if self._loaded is not None:
            self._loaded.close()  # unregisters the page-locked host memory
            self._loaded = None
        self.float8 = None
        self.prompts.clear()
        self._compiled = False
        gc.collect()
        _empty_cache()

    # -- generation ------------------------------------------------------------------------
    def generate(self, request: ImageRequest, on_step: StepCallback) -> list[Image]:
        """Sample the request's images, up to ``MemoryPlan.pass_images`` seeds per DiT pass
        (each block computing as many at once as ``MemoryPlan.batch_for`` allows), the passes
        one after another. Exceptions (``on_step``'s abort, ``torch.cuda.OutOfMemoryError``)
        propagate to the engine.

        Image-to-image goes through diffsynth's own ``input_image``/``denoising_strength``
        and runs ``steps_run`` steps (the last ``strength`` of the schedule)."""
        if request.upscale_tile:  # tiles of at most max_pixels: fits where a 1024² image does
            with self._style(request) as request:
                return [upscale(request, lambda tile, part, step: self._one(part, step, tile),
                                on_step)]
        init = load_init_image(request) if request.init_image else None
        if self.plan is None:
            raise RuntimeError("FluxBackend.generate called before load()")
        images: list[Image] = []
        with self._style(request) as request:
            for first, count in batch_sizes(request.count, self.plan.pass_images):
                part = dataclasses.replace(request.one(first), count=count)
                images += self._run(part, per_batch(on_step, first, count, request.count), init)
        return images

    def _one(self, request: ImageRequest, on_step: StepCallback, init: Image | None) -> Image:
        return self._run(request, on_step, init)[0]

    def _run(self, request: ImageRequest, on_step: StepCallback,
             init: Image | None) -> list[Image]:
        """One pipeline call for the request's ``count`` seeds (engine/flux/batch.py)."""
        import torch

        from engine.flux.pipeline import step_reporter

        if self.plan is None:
            raise RuntimeError("FluxBackend.generate called before load()")
        if self._pipe is None:  # a failed re-plan dropped it: load it again for this image
            self._reload()
            if self._pipe is None:
                raise RuntimeError("the FLUX pipeline could not be loaded again; see the log")
        sync = torch.cuda.synchronize if self.plan.device.startswith("cuda") else None
        tile_vae(self._pipe, self.plan.vae_tiled)
        start = {} if init is None else {"input_image": init,
                                           "denoising_strength": request.strength}
        chunk = self.plan.batch_for(request.width, request.height, request.count)
        several = (batched(self._pipe, request.seeds, chunk) if request.count > 1
                   else nullcontext())
        with several:
            out = self._pipe(
                prompt=request.prompt,
                seed=request.seed,
                num_inference_steps=request.steps_run,
                **start,
                height=request.height,
                width=request.width,
                embedded_guidance=request.guidance,
                cfg_scale=1.0,  # FLUX.1-dev is guidance-distilled: no negative pass
                rand_device="cpu",  # the same seed gives the same image on any GPU
                # diffsynth's `tiled` also runs the DiT tile by tile (nine whole passes a step at
                # 1024²); only the VAE decode is tiled, by tile_vae
                tiled=False,
                progress_bar_cmd=step_reporter(on_step, sync),
            )
        return out if isinstance(out, list) else [out]

    # -- styles (LoRA) --------------------------------------------------------------------
    def _read_styles(self) -> float:
        """Find (download) and read every style's LoRA into host memory, once; returns the
        GiB the largest takes on the GPU while active, which the memory plan sets aside."""
        from engine.flux.lora import pad_ranks, read_lora
        from engine.styles import ensure_style_files

        if not self.styles:
            return 0.0
        paths = ensure_style_files(self.styles, self.config, self._downloader)
        self._loras = {name: read_lora(str(path)) for name, path in paths.items()}
        for name, weights in self._loras.items():
            log.info("style %s: LoRA of rank %d on %d layers, %.2f GiB in host memory", name,
                     weights.rank, len(weights.pairs), weights.nbytes / GIB)
        ranks = pad_ranks(self._loras.values())
        return max(w.nbytes_at(ranks) for w in self._loras.values()) / GIB

    def _attach_styles(self) -> None:
        """Hook the DiT layers any style targets (once per pipeline; engine/flux/lora.py)."""
        from engine.flux.lora import LoraBranches, lora_targets, pad_ranks

        dit = getattr(self._pipe, "dit", None)
        if not self._loras or dit is None:
            return
        targets = lora_targets(dit)
        for style, weights in list(self._loras.items()):
            fitting = weights.fitting(targets)
            missed = len(weights.pairs) - len(fitting.pairs)
            if missed:
                log.warning("style %s: %d of its %d layers are not in this DiT or not of their "
                            "shapes; ignored", style, missed, len(weights.pairs))
            self._loras[style] = fitting
        names = {name for weights in self._loras.values() for name in weights.pairs}
        self._branches = LoraBranches.attach(dit, names)
        self._branches.pad_ranks = pad_ranks(self._loras.values())

    @contextlib.contextmanager
    def _style(self, request: ImageRequest) -> Iterator[ImageRequest]:
        """The request's style on the DiT for this job (its trigger words before the prompt),
        cleared afterwards whatever happens; the float8 weights are never touched."""
        from engine.styles import prompt_for_model

        if not request.style:
            yield request
            return
        if self._pipe is None:  # a failed re-plan dropped the pipeline (and its hooks)
            self._reload()
        style, weights = self.styles.get(request.style), self._loras.get(request.style)
        if style is None or weights is None or self._branches is None:
            raise GenerationFailed(N_("The style '{style}' is no longer set up on this bot; "
                                      "/styles lists the styles there are."), style=request.style)
        assert self.plan is not None
        with self._branches.active(weights, style.alpha, self.plan.device):
            log.info("style %s on %d layers (%.1f ms to switch)", request.style,
                     len(weights.pairs), self._branches.switch_s * 1000)
            yield request.with_changes(prompt=prompt_for_model(request.prompt, style))

    # -- memory ----------------------------------------------------------------------------
    def reduce_memory(self) -> bool:
        """After an out-of-memory error (called once the failed pass's frames are gone): free
        what it left, move to the next tighter plan and keep the models' state consistent.
        False when the plan is already the tightest or the tighter one could not be applied
        (the last working plan is then back in force)."""
        self.recover_after_failure()
        if self.plan is None:
            return False
        nxt = tighter_after_oom(self.plan)
        for _ in range(MAX_REPLAN_TRIES):  # a plan that cannot be applied: the next one down
            if nxt is None:
                return False
            log.warning("out of GPU memory; %s", nxt.describe())
            if self._switch(nxt):
                return True
            nxt = tighter_after_oom(nxt)
        return False

    def recover_after_failure(self) -> None:
        """After any failed pass: both streamers drop their buffers and the prefetch they had
        in flight, the parked models leave the GPU, diffsynth's managed layers go back to
        their offload place, and the cache is emptied, so the next pass starts from a clean
        state."""
        for handle in (self._stream, self._t5_stream):
            if handle is not None:
                handle.release_buffers()
        for parked in self._parked:
            parked.park()
        pipe = self._pipe
        if pipe is not None and getattr(pipe, "vram_management_enabled", False) \
                and hasattr(pipe, "load_models_to_device"):
            pipe.load_models_to_device([])  # managed layers back to their offload place
        gc.collect()
        _empty_cache()

    def _switch(self, nxt: MemoryPlan) -> bool:
        """Apply ``nxt``; on failure go back to the plan that worked (reloading it when the
        failed apply had rebuilt the pipeline for ``nxt``)."""
        old = self.plan
        try:
            self._apply(nxt)
            return True
        except Exception:  # noqa: BLE001 - any failure: the old plan must come back
            log.exception("could not apply the tighter memory plan; keeping %s",
                          old.preset if old else "none")
        self.plan = old
        if self._pipe is None or self._built_for is not old:
            self._reload()
        return False

    def _reload(self) -> None:
        """Build the pipeline for ``self.plan`` again. If that fails too the pipeline stays
        dropped, and the next ``generate`` tries once more (the bot keeps answering)."""
        self.close()
        try:
            self._build()
            self._finish_setup()
        except Exception:  # noqa: BLE001 - logged; generate retries the reload
            log.exception("reloading the FLUX pipeline failed; the next image tries again")
            self.close()

    def _apply(self, nxt: MemoryPlan, calibrate: bool = True) -> None:
        """Move to ``nxt``: the streamer moves blocks in place (no reload; it rolls itself
        back when a move fails); diffsynth's managed layers get the new limit; a change of
        where any model lives reloads the pipeline and applies compile and float8 again."""
        from engine.flux import pipeline
        from engine.flux.residency import dit_residency

        assert self.plan is not None
        same_layout = nxt.placements == self.plan.placements
        if same_layout and self._stream is not None and self._factory is None:
            # the layout's layer work already covers the casts (layer_work_bytes takes the max)
            residency = dit_residency(nxt, self._stream.plan.block_bytes,
                                      self._stream.plan.fixed_bytes, self._stream.others,
                                      self._stream.plan.layer_cast_bytes)
            self._stream.relayout(residency)
            self.plan = self._built_for = nxt
        elif same_layout and self._pipe is not None and self._factory is None:
            pipeline.set_vram_limit(self._pipe, nxt.vram_limit_gib)
            self.plan = self._built_for = nxt
        else:
            self.close()
            self.plan = nxt
            self._build()
            self._finish_setup(calibrate)

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

    def model_state(self) -> ModelState | None:
        # called from the event loop while the worker may re-plan: read each reference once
        plan, loaded = self.plan, self._loaded
        if plan is None:
            return None
        if loaded is None:  # a failed re-plan dropped the pipeline; the next image reloads it
            return ModelState(plan.preset, loaded=False)
        blocks = on_gpu = None  # diffsynth's own offloading: it decides, layer by layer
        stream = loaded.dit_stream
        if stream is not None:
            residency = stream.plan
            blocks = len(residency.placements)
            on_gpu = blocks - len(residency.streamed)
        elif plan.preset == "max" and hasattr(loaded.pipe, "dit"):
            from engine.flux.streaming import dit_blocks

            blocks = on_gpu = len(dit_blocks(loaded.pipe.dit))
        return ModelState(plan.preset, blocks, on_gpu, self._compiled,
                          self.compile_failure is not None)

    # -- start-up --------------------------------------------------------------------------
    def _check_device(self, torch: Any) -> None:
        if self.config.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(
                f"model.device is {self.config.device!r} but PyTorch sees no CUDA GPU "
                f"(torch {torch.__version__}); install a CUDA build of torch, set "
                'model.device = "cpu" (very slow), or use backend = "dry-run"')

    def _enable_float8(self) -> None:
        """Float8 matmuls for the block-streamed DiT whose layers cast their own weights
        (``layer_cast``), or, with ``float8_compute = true``, the resident one (``max``); a
        diffsynth-managed DiT keeps bf16 matmuls. The log says why not: a warning when the
        user asked for float8 (true), a note when "auto" found it does not apply here."""
        from engine.flux.float8_compute import enable_float8_compute, enable_float8_matmuls

        assert self.plan is not None
        say = log.warning if self.config.float8_compute is True else log.info
        if not float8_wanted(self.config):
            say("model.float8_compute = \"auto\" runs float8 matmuls only in compiled blocks on "
                "a CUDA GPU; computing in bf16")
            return
        if self._float8_problem is not None:  # probed when planning (_planning_config)
            say("model.float8_compute: %s; computing in bf16", self._float8_problem)
            return
        stream = self._stream
        if stream is not None and stream.layer_cast:
            self.float8 = enable_float8_matmuls(stream.dit)
            return
        if self.plan.preset == "max" and self.config.float8_compute is True:
            self.float8 = enable_float8_compute(self._pipe.dit)
            _empty_cache()  # the bf16 weights just freed
            return
        say("model.float8_compute applies to DiT block streaming with model.layer_cast, and to "
            "the max preset when set to true (plan: %s); computing in bf16", self.plan.preset)

    def _compile(self) -> None:
        """Regional torch.compile of the DiT blocks (streamed or resident). The compiler runs in
        the start-up warm-up (``_try_warm_up``), before the bot says it is ready, so that no
        user waits for it; where it fails (no Triton, an old GPU) the blocks go back to eager."""
        from engine.flux.pipeline import compile_dit_blocks

        assert self.plan is not None
        self.compile_failure = None  # this pipeline's compile, not an earlier one's
        if not self.plan.device.startswith("cuda"):
            log.info("model.compile applies to CUDA devices only; running eager")
            return
        if self._stream is None and self.plan.preset != "max":
            log.warning("model.compile needs DiT streaming or the max preset; running eager")
            return
        compile_dit_blocks(self._pipe.dit)
        self._compiled = True

    def _try_warm_up(self) -> bool:
        """One warm-up (``_warm_up``); True when it ran out of GPU memory. A compiler failure
        puts the blocks back to eager and warms up again."""
        import torch

        from engine.flux.pipeline import uncompile_dit_blocks

        started = time.monotonic()
        failure, oom = None, False
        try:
            self._warm_up()
        except torch.cuda.OutOfMemoryError:
            oom = True
        except Exception as e:
            if not self._compiled:
                raise
            failure = f"{type(e).__name__}: {str(e)[:300]}"
        if failure is not None:  # any compiler failure: eager still works
            uncompile_dit_blocks(self._pipe.dit)
            self._compiled = False
            self.compile_failure = failure
            self._float8_off_when_eager()
            self.recover_after_failure()
            log.warning("torch.compile failed (%s); running eager (slower steps)", failure)
            return self._try_warm_up()
        if self._compiled and not oom and self.compile_seconds is None:
            self.compile_seconds = time.monotonic() - started
            log.info("compiled and warmed up in %.1f s", self.compile_seconds)
        return oom

    def _float8_off_when_eager(self) -> None:
        """"auto" runs float8 matmuls in compiled blocks only: eager, scaling each layer's input
        costs more than float8 saves. The plan stays (it holds no bf16 copies; a cast takes
        less room than a quantized input), only the layers go back to casting."""
        from engine.flux.float8_compute import disable_float8_matmuls

        if self.config.float8_compute == "auto" and self.float8 is not None \
                and self.float8.streamed and self._stream is not None:
            disable_float8_matmuls(self._stream.dit)
            self.float8 = None
            log.warning("float8 matmuls off with the eager blocks (model.float8_compute = "
                        "\"auto\"); computing in bf16")

    def _warm_up(self) -> None:
        """Two-step images: a whole pass (``MemoryPlan.pass_images``) at the largest size the
        limits allow, the memory peak; with compiled blocks also one image at 512² and a pass
        of them, which several fit in a block's chunk at once (torch's dynamic-shape graphs for
        sizes and chunks, which every later size, aspect ratio and batch then uses without
        compiling again). With compiled blocks and styles, the same passes again with a style
        on: a block with a LoRA branch is a graph of its own, and compiling it at a user's first
        styled job cost that job 10-16 s on an H100 (docs/benchmarks.md, LoRA styles). All
        styles are padded to the same ranks, so one style per set of layers reached covers
        them."""
        assert self.plan is not None
        largest, most = warm_up_side(self.max_pixels), self.plan.pass_images
        passes = [(largest, most)]
        if self._compiled and largest != 512 and 512 * 512 <= self.max_pixels:
            passes += [(512, 1)] + ([(512, most)] if most > 1 else [])
        runs = [(side, count, "") for side, count in passes]
        if self._compiled and self._branches is not None:
            styles = self._warm_up_styles()
            runs += [(*passes[i % len(passes)], styles[i % len(styles)])
                     for i in range(max(len(passes), len(styles)))]
        for side, count, style in runs:
            warm = ImageRequest(prompt="warm-up", seed=0, steps=2, width=side, height=side,
                                guidance=3.5, count=count, style=style)
            self.generate(warm, lambda i, n: None)

    def _warm_up_styles(self) -> list[str]:
        """The styles the warm-up runs: on the GPU every style is padded to the same ranks
        (engine/flux/lora.py), so the compiled graphs differ only by which layers a style
        reaches; one style for each such set of layers (usually one for all), the one the plan
        sets memory aside for first."""
        ranks = self._branches.pad_ranks
        largest_first = sorted(self._loras, key=lambda n: (-self._loras[n].nbytes_at(ranks), n))
        chosen: dict[frozenset[str], str] = {}
        for name in largest_first:
            chosen.setdefault(frozenset(self._loras[name].pairs), name)
        return list(chosen.values())

    def _calibrate(self) -> None:
        """Warm up, measure the process's real peak on the device (the driver's free memory,
        so the CUDA context, kernels and fragmentation count), and tighten the plan until it
        stays inside the device budget with a margin. An out-of-memory error here tightens the
        plan too, instead of stopping the bot."""
        import torch

        for _ in range(MAX_CALIBRATIONS):
            assert self.plan is not None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.plan.device)
            self.prompts.clear()  # each warm-up measures the text encoders' phase as well
            if self._try_warm_up():  # out of memory; the failed pass's tensors are gone now
                self.recover_after_failure()
                nxt = tighter_after_oom(self.plan)
                self.calibration.append("warm-up ran out of memory")
                if nxt is None:
                    raise torch.cuda.OutOfMemoryError(
                        "the model does not fit this GPU even with everything streamed; "
                        "free GPU memory (close other programs) or lower limits.max_pixels")
                log.warning("warm-up ran out of GPU memory; %s", nxt.describe())
                self._apply(nxt, calibrate=False)
                continue
            grown = self._grown_gib(torch)
            budget = self.plan.device_budget
            excess = 0.0 if budget is None else calibration_excess_gib(budget, grown)
            self.calibration.append(f"peak {grown:.2f} GiB above the start"
                                    + (f", {excess:.2f} GiB over" if excess else ""))
            if excess <= 0:
                log.info("warm-up peak: the process grew %.2f GiB on the device (budget %.2f)",
                         grown, budget.growth_gib if budget else float("nan"))
                return
            nxt = calibrated(self.plan, excess)
            if nxt is None:
                raise torch.cuda.OutOfMemoryError(
                    f"the warm-up needed {grown:.2f} GiB, more than this GPU's budget allows")
            log.warning("warm-up peak %.2f GiB is %.2f GiB over the budget; %s", grown, excess,
                        nxt.describe())
            self._apply(nxt, calibrate=False)
        raise torch.cuda.OutOfMemoryError("no memory plan kept the warm-up inside the budget")

    def _grown_gib(self, torch: Any) -> float:
        """GiB the process grew on the device since the plan was made, at the warm-up's peak:
        what the driver shows it holds now, plus what the allocator held at its peak above
        what it holds now (diffsynth empties the cache between phases)."""
        assert self._at_plan is not None and self.plan is not None
        free0, reserved0 = self._at_plan
        free, reserved = _allocator_snapshot(torch, self.plan.device)
        peak = torch.cuda.max_memory_reserved(self.plan.device)
        return ((free0 - free) + max(0, peak - reserved)) / GIB


# Warm-ups at start-up before the bot gives up finding a plan that fits.
MAX_CALIBRATIONS = 5
# Tighter plans tried after one out-of-memory error when applying one fails.
MAX_REPLAN_TRIES = 3


def tighter_after_oom(plan: MemoryPlan) -> MemoryPlan | None:
    """A streaming plan tiles its VAE decode and gives up 10% of its budget (at least 0.5 GiB)
    per out-of-memory error: every step lowers the plan's peak (tiling alone would hand the
    decode's room to DiT blocks, and ``balanced`` -> ``low`` is the same layout). Every other
    plan takes the next rung of ``tighter``."""
    if plan.streaming and plan.budget_gib is not None:
        why = f"tightened after running out of GPU memory (was {plan.budget_gib:.2f} GiB)"
        tiled = dataclasses.replace(plan, vae_tiled=True)
        return with_less(tiled, max(0.5, 0.1 * plan.budget_gib), why)
    return tighter(plan)


def calibrated(plan: MemoryPlan, excess_gib: float) -> MemoryPlan | None:
    """The plan after a warm-up measured ``excess_gib`` over the budget."""
    if plan.streaming and plan.budget_gib is not None:
        return with_less(plan, excess_gib + 0.1,
                         f"calibrated: the warm-up peaked {excess_gib:.2f} GiB over the budget")
    return tighter(plan)


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


def _allocator_snapshot(torch: Any, device: str) -> tuple[int, int]:
    """(bytes free on the device as the driver sees it, bytes PyTorch's allocator holds)."""
    if not device.startswith("cuda"):
        return 0, 0
    free, _ = torch.cuda.mem_get_info(device)
    return free, torch.cuda.memory_reserved(device)


def _prefer_expandable_segments(torch: Any, config: ModelSection) -> None:
    """The caching allocator's expandable segments (``model.expandable_segments``): a block
    freed in one phase is usable by the next at any size, so little is lost to fragmentation.
    Only before the first allocation, and never over the user's own PYTORCH_CUDA_ALLOC_CONF."""
    if not (config.expandable_segments and config.device.startswith("cuda")):
        return
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    if torch.cuda.is_initialized():
        log.info("CUDA is initialised already; the allocator keeps its settings")
        return
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError) as e:  # an older torch: fragmentation margin only
        log.info("expandable segments unavailable (%s)", e)


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
