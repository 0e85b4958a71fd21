"""Host (CPU) memory of loading the FLUX pipeline and laying it out for streaming, phase by phase.

    python bench/bench_host_rss.py ROOT [--preset low] [--budget-gib 8] [--device emulate]
                                   [--order ours|built] [--parts dit,clip,t5,vae] [--images 0]
    python bench/bench_host_rss.py --write-checkpoint DIR [--parts t5,dit]

ROOT is a FLUX.1-dev folder (``flux1-dev.safetensors``, ``text_encoder/``, ``text_encoder_2/``,
``ae.safetensors``, the tokenizers): the real one, or the random one that
``bench/make_random_flux.py`` writes (``--write-checkpoint`` runs it for ``--parts``; it writes
one tensor at a time, so machines with less RAM than the 24 GB DiT file can too). Runs the product's load path
(``pipeline.load_pipeline``; ``--order built``: ``build_pipeline``, ``start_t5_streaming``,
``start_dit_streaming``) and prints, per phase, the resident set at its end (VmRSS), the most a
20 ms sampler saw during it, and the process's peak (ru_maxrss, what bench_measure.py reports).
``--device emulate`` (the default) measures the host side of a GPU run without a GPU: what the
streamer would put on the GPU is dropped. ``--device cpu`` keeps it in host memory; ``cuda`` is
the real thing, and ``--images`` then samples 1024² images after loading. ``--parts`` loads only
some models (``--order built``); ``--abort-above-gib`` stops the run before it crowds the machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.flux.host_memory import resident_bytes  # noqa: E402

GIB = 1024**3
PARTS = ("dit", "clip", "t5", "vae")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@dataclass
class Phase:
    name: str
    end: int = 0
    sampled_max: int = 0
    peak: int = 0
    seconds: float = 0.0


@dataclass
class Recorder:
    """Samples VmRSS in a thread and keeps the highest value per phase; stops the process when
    it passes ``abort_above`` (other work shares this machine)."""

    abort_above: int
    interval: float = 0.02
    phases: list[Phase] = field(default_factory=list)
    _current: Phase | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            rss = resident_bytes()
            phase = self._current
            if phase is not None:
                phase.sampled_max = max(phase.sampled_max, rss)
            if rss > self.abort_above:
                print(f"\nABORT: VmRSS {rss / GIB:.2f} GiB passed --abort-above-gib "
                      f"during {phase.name if phase else '?'}", flush=True)
                self.print_table()
                os._exit(3)
            time.sleep(self.interval)

    @contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        outer = self._current
        indent = "" if outer is None else outer.name[:len(outer.name) - len(outer.name.lstrip())]
        record = Phase(("" if outer is None else indent + "  ") + name, sampled_max=resident_bytes())
        self.phases.append(record)
        self._current = record
        started = time.monotonic()
        try:
            yield record
        finally:
            record.seconds = time.monotonic() - started
            record.end, record.peak = resident_bytes(), peak_rss()
            record.sampled_max = max(record.sampled_max, record.end)
            self._current = outer
            if outer is not None:
                outer.sampled_max = max(outer.sampled_max, record.sampled_max)

    def print_table(self) -> None:
        print(f"{'phase':<34}{'RSS end':>9}{'max seen':>10}{'peak':>8}{'s':>7}   (GiB)")
        for p in self.phases:
            print(f"{p.name:<34}{p.end / GIB:>9.2f}{p.sampled_max / GIB:>10.2f}"
                  f"{p.peak / GIB:>8.2f}{p.seconds:>7.1f}")
        print(f"peak RSS (ru_maxrss): {peak_rss() / GIB:.2f} GiB", flush=True)


def label_loads(recorder: Recorder, root: str) -> None:
    """One sub-phase per model file diffsynth loads (instrumentation only)."""
    from diffsynth.models.model_loader import ModelPool

    original = ModelPool.auto_load_model

    def auto_load_model(self: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        first = path[0] if isinstance(path, list) else path
        with recorder.phase("load " + os.path.relpath(first, root)):
            return original(self, path, *args, **kwargs)

    ModelPool.auto_load_model = auto_load_model  # type: ignore[method-assign]


def only_parts(parts: tuple[str, ...]) -> None:
    """Make ``pipeline.model_configs`` return only the chosen models' configs."""
    from engine.flux import pipeline

    original = pipeline.model_configs

    def model_configs(plan: Any, paths: Any) -> list[Any]:
        return [c for part, c in zip(PARTS, original(plan, paths), strict=True) if part in parts]

    pipeline.model_configs = model_configs  # type: ignore[assignment]


def paths_under(root: Path) -> Any:
    from bench import make_random_flux as mrf
    from engine.flux.model_files import ModelPaths

    return ModelPaths(dit=str(root / mrf.DIT_FILE), text_encoder=str(root / mrf.CLIP_FILE),
                      text_encoder_2=[str(root / f) for f in mrf.T5_FILES],
                      vae=str(root / mrf.VAE_FILE), tokenizer=str(root / "tokenizer"),
                      tokenizer_2=str(root / "tokenizer_2"))


def gpu_share(handle: Any) -> int:
    """Bytes of a streamed model that a GPU would hold instead of the host: the fp8-resident
    blocks' packed weights and the bf16 'fixed' weights."""
    from engine.flux.residency import FP8

    plan = handle.plan
    packed = sum(size for size, where in zip(plan.block_bytes, plan.placements, strict=True)
                 if where == FP8)
    return packed + plan.fixed_bytes


def label_streaming(recorder: Recorder) -> None:
    """Phases for the streamers' set-up, wherever the load path calls them."""
    from engine.flux import pipeline

    for name in ("start_t5_streaming", "start_dit_streaming"):
        original = getattr(pipeline, name)

        def labelled(*args: Any, _original: Any = original, _name: str = name,
                     **kwargs: Any) -> Any:
            with recorder.phase(_name):
                return _original(*args, **kwargs)

        setattr(pipeline, name, labelled)


def emulate_gpu() -> None:
    """``--device emulate``: the streamer runs on the CPU, but what it would put on the GPU
    (the fp8- and bf16-resident blocks, the non-block weights, its work buffer and staging
    slots) is dropped instead of kept in host memory, so the host side of a GPU run can be
    measured without one. Sampling cannot run afterwards."""
    import torch

    from engine.flux.residency import STREAMED
    from engine.flux.streaming import StreamingHandle

    def move_fixed(self: Any, blocks: list[Any]) -> None:
        packed = {id(p) for b in blocks for p in b.parameters() if p.dim() >= 2}
        for p in self.dit.parameters():
            if id(p) not in packed:
                p.data = torch.empty(0, dtype=self.compute_dtype)

    def pack_resident(self: Any) -> None:
        for block in self._blocks:
            if block.placement != STREAMED:
                block.source = torch.empty(block.numel, dtype=self.storage_dtype, device="meta")
                self._release(block)

    StreamingHandle._move_fixed = move_fixed  # type: ignore[method-assign]
    StreamingHandle._pack_resident = pack_resident  # type: ignore[method-assign]
    StreamingHandle._make_buffers = lambda self: None  # type: ignore[method-assign]


def load(args: argparse.Namespace, recorder: Recorder, plan: Any, paths: Any) -> tuple[Any, ...]:
    """(pipe, DiT handle, T5 handle) through the product's load path: ``load_pipeline``
    (``--order ours``), or build_pipeline then the streamers (``--order built``, the order
    FluxBackend._build used before load_pipeline)."""
    from engine.flux import pipeline

    if args.order == "ours" and hasattr(pipeline, "load_pipeline"):
        with recorder.phase("load_pipeline"):
            loaded = pipeline.load_pipeline(plan, paths)
        if loaded.t5_stream is not None:  # the DiT's budget reserved this for T5 ahead
            print(f"reserved for T5 from the headers: "
                  f"{pipeline.other_weights(plan, paths).text / 2**20:.1f} MiB (with CLIP); "
                  f"T5 fixed as laid out: {loaded.t5_stream.plan.fixed_bytes / 2**20:.1f} MiB")
        return loaded.pipe, loaded.dit_stream, loaded.t5_stream
    with recorder.phase("build_pipeline"):
        pipe = pipeline.build_pipeline(plan, paths)
    t5 = dit = None
    if pipe.text_encoder_2 is not None and plan.stream_t5:
        t5 = pipeline.start_t5_streaming(pipe, plan)
    if pipe.dit is not None and plan.streaming:
        dit = pipeline.start_dit_streaming(pipe, plan)
    return pipe, dit, t5


def run(args: argparse.Namespace) -> int:
    recorder = Recorder(abort_above=int(args.abort_above_gib * GIB))
    recorder.start()
    with recorder.phase("import torch, diffsynth"):
        import torch

        from engine.flux.presets import make_plan
    root = Path(args.root)
    parts = tuple(p for p in args.parts.split(",") if p)
    label_loads(recorder, str(root))
    label_streaming(recorder)
    if parts != PARTS:
        only_parts(parts)
    if args.device == "emulate":
        emulate_gpu()
    device = "cpu" if args.device == "emulate" else args.device
    plan = make_plan(args.preset, device, args.budget_gib, stream_dit=True)
    pipe, dit, t5 = load(args, recorder, plan, paths_under(root))
    on_gpu = sum(gpu_share(h) for h in (dit, t5) if h is not None)
    if dit is not None:
        print("DiT residency:", dit.plan.describe())
    if args.images and args.device == "emulate":
        print("--images needs --device cpu or cuda; none sampled")
    for index in range(args.images if args.device != "emulate" else 0):
        with recorder.phase(f"image {index + 1} (1024², 4 steps)"):
            pipe(prompt="a red fox", seed=index, num_inference_steps=4, height=1024, width=1024,
                 embedded_guidance=3.5, cfg_scale=1.0, rand_device="cpu", tiled=plan.vae_tiled,
                 tile_size=64, tile_stride=32)
    print(f"\npreset {args.preset}, budget {args.budget_gib} GiB, device {args.device}, "
          f"order {args.order}, parts {','.join(parts)}, torch {torch.__version__}")
    recorder.print_table()
    if args.device == "cpu":
        print(f"of the RSS at the end, a GPU would hold {on_gpu / GIB:.2f} GiB instead "
              "(fp8-resident blocks and bf16 fixed weights)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", help="the FLUX.1-dev folder")
    parser.add_argument("--preset", default="low", choices=("low", "balanced"))
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--device", default="emulate",
                        help="emulate (default, no GPU needed): the host side of a GPU run, "
                        "what the streamer would put on the GPU is dropped; cpu: it stays in "
                        "host memory; cuda: the real thing (on the GPU machine)")
    parser.add_argument("--order", default="ours", choices=("ours", "built"),
                        help="ours: pipeline.load_pipeline; built: build_pipeline, then "
                        "start_t5_streaming and start_dit_streaming")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="models to load (default all): dit,clip,t5,vae")
    parser.add_argument("--images", type=int, default=0, help="1024² images to sample after")
    parser.add_argument("--abort-above-gib", type=float, default=18.0)
    parser.add_argument("--write-checkpoint", type=Path, metavar="DIR",
                        help="write a random checkpoint of --parts under DIR and exit")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if args.write_checkpoint is not None:
        from bench import make_random_flux as mrf

        mrf.make(args.write_checkpoint, (*args.parts.split(","), "tokenizers"))
        return 0
    if args.root is None:
        parser.error("give the FLUX.1-dev folder (or --write-checkpoint DIR)")
    if args.parts != ",".join(PARTS) and args.order != "built":
        parser.error("--parts loads through build_pipeline: add --order built")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
