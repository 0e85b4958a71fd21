"""The measuring half of ``bench_engine.py``: runs inside one child process per row (torch here).

Times come from a stand-in for diffsynth's ``progress_bar_cmd`` that synchronises the GPU when the
first timestep is handed out and after every step, so "before the first step", each step and
"after the last step" are separate and honest.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import make_random_flux as mrf

GIB = 1024**3
PROMPT = "a red fox in fresh snow at dawn, detailed photograph, 35mm"


@dataclass(frozen=True)
class Spec:
    setup: str  # ours-<preset>[+compile][+fp8], baseline-low, baseline-resident
    engine: bool
    cap: float | None
    sizes: list[int]
    steps: int

    @property
    def ours(self) -> bool:
        return self.setup.startswith("ours-")

    @property
    def preset(self) -> str:
        return self.setup.removeprefix("ours-").split("+")[0]

    @property
    def options(self) -> set[str]:
        """``compile`` (model.compile) and ``fp8`` (model.float8_compute)."""
        return set(self.setup.split("+")[1:])


def parse_spec(text: str) -> Spec:
    setup, cap, sizes, steps = text.split(":")
    engine = "+engine" in setup
    setup = setup.replace("+engine", "")
    spec = Spec(setup, engine, float(cap) or None, [int(s) for s in sizes.split(",")], int(steps))
    unknown = spec.options - {"compile", "fp8"}
    if unknown or (spec.options and not spec.ours):
        raise ValueError(f"{text}: options {sorted(unknown) or sorted(spec.options)} unknown "
                         "here (ours-<preset> takes +compile, +fp8, +engine)")
    return spec


class StepTimer:
    """Records when denoising starts and when each step ends (GPU synchronised)."""

    def __init__(self, sync: Any, snapshot: Any) -> None:
        self.sync, self.snapshot = sync, snapshot
        self.first = 0.0
        self.ends: list[float] = []
        self.at_last: dict[str, float] = {}

    def wrap(self, on_step: Any = None, _sync: Any = None) -> Any:
        def progress(timesteps: Any) -> Any:
            items = list(timesteps)
            for i, item in enumerate(items, start=1):
                if i == 1:
                    self.sync()
                    self.first = time.perf_counter()
                yield item
                self.sync()
                self.ends.append(time.perf_counter())
                if i == len(items):
                    self.at_last = self.snapshot()
                if on_step is not None:
                    on_step(i, len(items))

        return progress


def run_floors() -> dict[str, Any]:
    import diffsynth
    import torch
    import transformers

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_s = time_cuda(lambda: a @ b, repeat=10)
    pinned = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    pinned.random_(0, 255)
    dev = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    h2d_s = time_cuda(lambda: dev.copy_(pinned, non_blocking=True), repeat=5)
    # diffsynth's copy of a CPU float8 layer: empty_like(bf16, cuda).copy_(cpu fp8)
    w8 = torch.randn(4096, 16384).to(torch.float8_e4m3fn)
    ds_s = time_cuda(lambda: torch.empty_like(w8, dtype=torch.bfloat16, device="cuda").copy_(w8),
                      repeat=5)
    return {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "diffsynth": getattr(diffsynth, "__version__", _dist_version("diffsynth")),
        "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "matmul_tflops": 2 * n**3 / matmul_s / 1e12,
        "h2d_pinned_gbs": GIB / h2d_s / 1e9,
        "diffsynth_copy_gbs": w8.numel() / ds_s / 1e9,  # float8 bytes of weights per second
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def time_cuda(fn: Any, repeat: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


# -- loading ------------------------------------------------------------------------------------
def checkpoint_paths(ckpt: Path) -> dict[str, Any]:
    root = ckpt / mrf.REPO_DIR
    return {"dit": str(root / mrf.DIT_FILE), "clip": str(root / mrf.CLIP_FILE),
            "t5": [str(root / f) for f in mrf.T5_FILES], "vae": str(root / mrf.VAE_FILE),
            "tokenizer": str(root / "tokenizer"), "tokenizer_2": str(root / "tokenizer_2")}


def load_ours(spec: Spec, ckpt: Path) -> Any:
    from engine.config import ModelSection
    from engine.flux.backend import FluxBackend

    config = ModelSection(preset=spec.preset, vram_limit_gib=spec.cap or 0.0,
                          models_dir=str(ckpt), offline=True, dit_path=checkpoint_paths(ckpt)["dit"],
                          compile="compile" in spec.options,
                          float8_compute="fp8" in spec.options)
    backend = FluxBackend(config)
    backend.load()
    return backend


def load_baseline(spec: Spec, ckpt: Path) -> Any:
    """Plain diffsynth, written out here so that the baseline does not depend on our builder."""
    import torch
    from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

    p = checkpoint_paths(ckpt)
    tokenizers = {"tokenizer_1_config": ModelConfig(path=p["tokenizer"]),
                  "tokenizer_2_config": ModelConfig(path=p["tokenizer_2"])}
    if spec.setup == "baseline-resident":
        configs = [ModelConfig(path=p[k]) for k in ("dit", "clip", "t5", "vae")]
        return FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cuda",
                                                 model_configs=configs, **tokenizers)
    fp8, bf16 = torch.float8_e4m3fn, torch.bfloat16
    # diffsynth's examples/flux/model_inference_low_vram/FLUX.1-dev.py, for the DiT
    dit_vram = {"offload_dtype": fp8, "offload_device": "cpu", "onload_dtype": fp8,
                "onload_device": "cpu", "preparing_dtype": fp8, "preparing_device": "cuda",
                "computation_dtype": bf16, "computation_device": "cuda"}
    # the seed loads the text encoders and the VAE in bf16 on the CPU
    rest_vram = {k: (bf16 if k.endswith("dtype") else v) for k, v in dit_vram.items()}
    configs = [ModelConfig(path=p["dit"], **dit_vram)]
    configs += [ModelConfig(path=p[k], **rest_vram) for k in ("clip", "t5", "vae")]
    limit = spec.cap if spec.cap else torch.cuda.mem_get_info()[1] / GIB - 0.5
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cuda",
                                             model_configs=configs, vram_limit=limit, **tokenizers)


# -- measuring ----------------------------------------------------------------------------------
def run_row(text: str, ckpt: Path) -> list[dict[str, Any]]:
    import torch

    spec = parse_spec(text)
    if spec.cap:
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(spec.cap * GIB / total)
    started = time.perf_counter()
    runner = load_ours(spec, ckpt) if spec.ours else load_baseline(spec, ckpt)
    load_s = time.perf_counter() - started
    pipe = runner._pipe if spec.ours else runner
    base = {"spec": text, "setup": spec.setup, "cap": spec.cap, "steps": spec.steps,
            "load_s": load_s, "plan": runner.plan.describe() if spec.ours else "diffsynth as-is",
            "preset": runner.plan.preset if spec.ours else spec.setup}
    if spec.ours:  # load() = build + (float8) + compile and warm-up
        base["compile_s"] = runner.compile_seconds
        base["float8"] = runner.float8.describe() if runner.float8 else None
        if runner._stream is not None:
            base["streaming"] = runner._stream.plan.describe()
    results = []
    for size in spec.sizes:
        images = 2 if spec.steps >= 10 else 1  # fast rows: the second image is the warm one
        for index in range(1, images + 1):
            record = measure_image(spec, runner, pipe, size, seed=index)
            results.append({**base, **record, "size": size, "image": f"{index}/{images}"})
        if spec.engine and size == spec.sizes[0]:
            results[-1].update(engine_overhead(runner, size, spec.steps))
    return results


def measure_image(spec: Spec, runner: Any, pipe: Any, size: int, seed: int) -> dict[str, Any]:
    import torch

    stream = getattr(runner, "_stream", None) if spec.ours else None
    timer = StepTimer(torch.cuda.synchronize, lambda: snapshot(pipe, stream))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if spec.ours:
        from engine.flux import pipeline as flux_pipeline

        original = flux_pipeline.step_reporter
        flux_pipeline.step_reporter = timer.wrap  # type: ignore[assignment]
        try:
            runner.generate(request(size, spec.steps, seed), lambda i, n: None)
        finally:
            flux_pipeline.step_reporter = original
    else:
        pipe(prompt=PROMPT, seed=seed, height=size, width=size, num_inference_steps=spec.steps,
             embedded_guidance=3.5, cfg_scale=1.0, rand_device="cpu", progress_bar_cmd=timer.wrap())
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    steps = [timer.ends[0] - timer.first] + [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)]
    return {
        "s_image": t1 - t0, "s_step": statistics.median(steps[1:] or steps), "step1_s": steps[0],
        "before_first_s": timer.first - t0, "after_last_s": t1 - timer.ends[-1],
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        **timer.at_last,
    }


def snapshot(pipe: Any, stream: Any = None) -> dict[str, float]:
    """At the end of the last step: where the DiT's weights are, and the device's used memory.
    Under our block streamer the parameters all look resident (they are views into its GPU
    work buffer); what crosses PCIe per step is its plan's streamed bytes."""
    import torch

    on_gpu = on_host = 0
    for tensor in [*pipe.dit.parameters(), *pipe.dit.buffers()]:  # float8 compute: buffers
        size = tensor.numel() * tensor.element_size()
        if tensor.device.type == "cuda":
            on_gpu += size
        else:
            on_host += size
    if stream is not None:
        on_host = stream.plan.streamed_bytes
    free, total = torch.cuda.mem_get_info()
    return {"dit_resident_gib": on_gpu / GIB, "dit_streamed_gib": on_host / GIB,
            "dit_streamed_bytes": float(on_host), "device_used_gib": (total - free) / GIB}


def request(size: int, steps: int, seed: int) -> Any:
    from engine.request import ImageRequest

    return ImageRequest(prompt=PROMPT, seed=seed, steps=steps, width=size, height=size,
                        guidance=3.5)


class _AlreadyLoaded:
    """The engine calls load(); the backend measured here is loaded already."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.model_name = backend, backend.model_name

    def load(self) -> None:
        pass

    def generate(self, req: Any, on_step: Any) -> Any:
        return self.backend.generate(req, on_step)

    def close(self) -> None:
        pass

    def reduce_memory(self) -> bool:
        return self.backend.reduce_memory()

    def memory_info(self) -> dict[str, float]:
        return self.backend.memory_info()

    def model_state(self) -> Any:
        return self.backend.model_state()


def engine_overhead(backend: Any, size: int, steps: int) -> dict[str, float]:
    """The same job called directly and through the Engine (queue, worker thread, PNG, journal)."""
    req = request(size, steps, seed=11)
    started = time.perf_counter()
    backend.generate(req, lambda i, n: None)
    direct_s = time.perf_counter() - started
    engine_s = asyncio.run(_through_engine(backend, req))
    return {"direct_s": direct_s, "engine_s": engine_s, "engine_overhead_s": engine_s - direct_s}


async def _through_engine(backend: Any, req: Any) -> float:
    from engine.config import Config
    from engine.engine import Engine
    from engine.request import Origin, User

    with tempfile.TemporaryDirectory() as tmp:
        config = Config()
        config.engine.database = str(Path(tmp) / "bench.sqlite3")
        config.engine.output_dir = str(Path(tmp) / "out")
        async with Engine(config, _AlreadyLoaded(backend)) as engine:  # type: ignore[arg-type]
            started = time.perf_counter()
            job = await engine.submit(User("cli", "bench"), req, Origin("cli"))
            await job.result()
            return time.perf_counter() - started
