"""Focused benchmark of the float8 block streamer (engine/flux/streaming.py) on a GPU.

A FluxDiT with random float8 weights is built in memory (no checkpoint on disk), and the
denoising loop diffsynth runs (``model_fn_flux_image`` + the FLUX.1 flow-match scheduler) is
timed under emulated card sizes (``torch.cuda.set_per_process_memory_fraction``):

    s/step at 1024² and 512² for each cap, planned by ``plan_residency`` with the reserve for a
    1024² image, against the transfer floor (bytes streamed per step / the pinned host -> GPU
    bandwidth measured in the same run) and the compute floor (the uncapped, all-bf16 step);
    then diffsynth's own low-VRAM DiT set-up under the same caps, where time allows.

    python3 bench/bench_streaming.py --caps 0,12,8,6 --sizes 1024,512 --steps 6 \
        --baseline-caps 12,8 --json $OUT/streaming.json

Also measured: the DiT's activation peak per image size and the VAE decode's (random
``FluxVAEDecoder``), which calibrate ``activation_reserve_bytes``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_measure import time_cuda  # noqa: E402
from engine.flux.pipeline import compile_dit_blocks, uncompile_dit_blocks  # noqa: E402
from engine.flux.residency import (  # noqa: E402
    GIB,
    dit_activation_bytes,
    plan_residency,
    vae_decode_bytes,
)
from engine.flux.streaming import enable_block_streaming, measure_blocks  # noqa: E402

FP8, BF16 = torch.float8_e4m3fn, torch.bfloat16
VAE_WEIGHTS = 168 * 1024**2  # FluxVAEDecoder in bf16, counted as resident by the plans here


# -- model and inputs ---------------------------------------------------------------------------
def random_flux_dit(std: float = 0.02, seed: int = 0, draw_on: str = "cuda",
                    single_blocks: int | None = None, dtype: torch.dtype = FP8,
                    device: str = "cpu", double_blocks: int | None = None) -> torch.nn.Module:
    """diffsynth's FluxDiT with random weights, every parameter ``dtype`` on ``device`` (by
    default float8 on the CPU, as an unmanaged float8 load leaves it). Drawn on the GPU: fast.
    ``single_blocks``/``double_blocks`` truncate the block lists (small models for CPU checks)."""
    from diffsynth.models.flux_dit import FluxDiT

    with torch.device("meta"):
        dit = FluxDiT()
    if single_blocks is not None:
        dit.single_blocks = dit.single_blocks[:single_blocks]
    if double_blocks is not None:
        dit.blocks = dit.blocks[:double_blocks]
    gen = torch.Generator(draw_on).manual_seed(seed)
    for module in dit.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if name == "weight" and p.dim() == 1:  # norm scales
                value = torch.ones(p.shape, device=draw_on)
            else:
                value = torch.randn(p.shape, device=draw_on, generator=gen) * std
            module._parameters[name] = torch.nn.Parameter(value.to(dtype).to(device),
                                                          requires_grad=False)
    return dit.eval()


def flux_inputs(width: int, height: int, seed: int = 0, device: str = "cuda") -> dict[str, Any]:
    """What diffsynth's pipeline units hand to ``model_fn_flux_image`` for one prompt."""
    g = torch.Generator("cpu").manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device, BF16)  # noqa: E731
    return {"latents": rnd(1, 16, height // 8, width // 8), "prompt_emb": rnd(1, 512, 4096),
            "pooled_prompt_emb": rnd(1, 768),
            "text_ids": torch.zeros(1, 512, 3, device=device, dtype=BF16),
            "guidance": torch.tensor([3.5], device=device, dtype=BF16)}


def denoise(dit: torch.nn.Module, inputs: dict[str, Any], steps: int,
            step_times: list[float] | None = None) -> torch.Tensor:
    from diffsynth.diffusion.flow_match import FlowMatchScheduler
    from diffsynth.pipelines.flux_image import model_fn_flux_image

    scheduler = FlowMatchScheduler("FLUX.1")
    scheduler.set_timesteps(steps)
    latents = inputs["latents"]
    with torch.no_grad():
        for t in scheduler.timesteps:
            started = time.perf_counter()
            timestep = t.unsqueeze(0).to(latents.device, BF16)
            pred = model_fn_flux_image(dit=dit, **{**inputs, "latents": latents},
                                       timestep=timestep)
            latents = scheduler.step(pred, t, latents)
            if latents.is_cuda:
                torch.cuda.synchronize()
            if step_times is not None:
                step_times.append(time.perf_counter() - started)
    return latents


# -- floors and peaks ---------------------------------------------------------------------------
def _cuda_seconds(fn: Any, repeat: int = 5) -> float:
    return time_cuda(fn, repeat=repeat)


def h2d_bandwidth(nbytes: int = GIB) -> dict[str, float]:
    """GB/s host -> GPU from memory page-locked in place (what the streamer uses), from
    torch's pinned allocator, and from pageable memory."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    out = {"pageable": nbytes / _cuda_seconds(lambda: dev.copy_(host), 3) / 1e9}
    torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0)
    out["registered"] = nbytes / _cuda_seconds(lambda: dev.copy_(host, non_blocking=True)) / 1e9
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
    pinned = host.pin_memory()
    out["pinned"] = nbytes / _cuda_seconds(lambda: dev.copy_(pinned, non_blocking=True)) / 1e9
    return out


def vae_peaks(sizes: list[int]) -> dict[str, float]:
    """Peak GPU bytes of a bf16 FluxVAEDecoder decode above its weights: untiled, and tiled
    with 64-latent tiles (diffsynth's pipeline default of 128 is one tile at 1024², and fails
    below: its TileWorker cannot unfold a latent smaller than a tile)."""
    from diffsynth.models.flux_vae import FluxVAEDecoder

    vae = FluxVAEDecoder().to("cuda", BF16).eval()
    out: dict[str, float] = {"weights_gib": sum(p.numel() * 2 for p in vae.parameters()) / GIB}
    for size in sizes:
        latents = torch.randn(1, 16, size // 8, size // 8, device="cuda", dtype=BF16)
        for name, kwargs in (("untiled", {}), ("tiled64", {"tiled": True, "tile_size": 64,
                                                          "tile_stride": 32})):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                with torch.no_grad():
                    vae(latents, **kwargs)
                torch.cuda.synchronize()
            except RuntimeError as e:  # noqa: PERF203
                out[f"{size}_{name}_error"] = str(e)[:120]
                continue
            peak = torch.cuda.max_memory_allocated() - base
            out[f"{size}_{name}_gib"] = peak / GIB
            out[f"{size}_{name}_bytes_per_pixel"] = peak / size**2
    del vae
    torch.cuda.empty_cache()
    return out


# -- rows ---------------------------------------------------------------------------------------
def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def set_cap(cap_gib: float | None) -> int:
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction(1.0 if not cap_gib else cap_gib * GIB / total)
    return int(cap_gib * GIB) if cap_gib else total - 2 * GIB


def engine_plan(dit: torch.nn.Module, budget: int, slots: int = 2) -> Any:
    """As the engine plans: the DiT's reserve for a 1024² image; the VAE (weights and an
    untiled decode) uses the streamer's released buffers between denoising loops."""
    block_sizes, fixed = measure_blocks(dit)
    return plan_residency(block_sizes, budget, dit_activation_bytes(1024, 1024),
                          fixed_bytes=fixed + VAE_WEIGHTS, slots=slots,
                          phase_reserve_bytes=vae_decode_bytes(1024, 1024))


def ours_rows(dit: torch.nn.Module, cap: float | None, sizes: list[int], steps: int,
              h2d_gbs: float, compile_blocks: bool = False, slots: int = 2,
              cast: str = "auto") -> list[dict[str, Any]]:
    plan = engine_plan(dit, set_cap(cap), slots)
    started = time.perf_counter()
    handle = enable_block_streaming(dit, plan, "cuda", cast=cast)
    setup_s = time.perf_counter() - started
    if compile_blocks:
        compile_dit_blocks(dit)
    rows = []
    try:
        for size in sizes:
            torch.cuda.synchronize()
            weights = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            times: list[float] = []
            denoise(dit, flux_inputs(size, size), steps, times)
            per_step = statistics.median(times[1:]) if len(times) > 1 else times[0]
            floor = plan.streamed_bytes / (h2d_gbs * 1e9)
            rows.append({
                "setup": "ours" + ("+compile" if compile_blocks else "")
                + ("" if cast == "auto" else f"+cast-{cast}")
                + ("" if slots == 2 else f"+{slots}slots"),
                "cap_gib": cap,
                "size": size, "steps": steps, "s_per_step": per_step, "step1_s": times[0],
                "transfer_floor_s": floor, "streamed_gb_per_step": plan.streamed_bytes / 1e9,
                "plan": plan.describe(), "setup_s": setup_s,
                "weights_gib": weights / GIB,
                "activation_peak_gib": (torch.cuda.max_memory_allocated() - weights) / GIB,
                "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
                "planned_peak_gib": plan.peak_bytes / GIB,
                "stats": handle.stats(), "graphs": _graph_count()})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        handle.close()
        if compile_blocks:
            uncompile_dit_blocks(dit)
    return rows


def baseline_row(dit: torch.nn.Module, cap: float, size: int, steps: int) -> dict[str, Any]:
    """diffsynth's low-VRAM DiT set-up (examples/flux/model_inference_low_vram), vram_limit =
    cap; the DiT is wrapped in place, so this runs last."""
    from diffsynth.configs import VRAM_MANAGEMENT_MODULE_MAPS
    from diffsynth.core.vram.layers import enable_vram_management
    from diffsynth.models.model_loader import ModelPool

    set_cap(cap)
    pool = ModelPool()
    mapping = VRAM_MANAGEMENT_MODULE_MAPS["diffsynth.models.flux_dit.FluxDiT"]
    module_map = {pool.import_model_class(k): pool.import_model_class(v)
                  for k, v in mapping.items()}
    vram = {"offload_dtype": FP8, "offload_device": "cpu", "onload_dtype": FP8,
            "onload_device": "cpu", "preparing_dtype": FP8, "preparing_device": "cuda",
            "computation_dtype": BF16, "computation_device": "cuda"}
    managed = enable_vram_management(dit, module_map, vram, vram_limit=cap)
    for m in managed.modules():
        if hasattr(m, "offload"):
            m.offload()
    for m in managed.modules():
        if hasattr(m, "onload"):
            m.onload()
    torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    denoise(managed, flux_inputs(size, size), steps, times)
    row = {"setup": "diffsynth-low-vram", "cap_gib": cap, "size": size, "steps": steps,
           "s_per_step": statistics.median(times[1:]), "step1_s": times[0],
           "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB}
    print(json.dumps(row), flush=True)
    for m in managed.modules():
        if hasattr(m, "offload"):
            m.offload()
    return row


def _fmt(x: float | None, digits: int = 3) -> str:
    return "" if not x else f"{x:.{digits}f}"


def cast_rates(total_elements: int) -> dict[str, float]:
    """float8 -> bf16 cast of one double block's weights: GB/s (read + written) and the
    milliseconds a pass over ``total_elements`` costs, for each cast kind."""
    from engine.flux.residency import FLUX_DOUBLE_BLOCK_WEIGHTS
    from engine.flux.streaming import _make_cast

    n = FLUX_DOUBLE_BLOCK_WEIGHTS
    src = torch.randn(n, device="cuda").to(FP8)
    dst = torch.empty(n, device="cuda", dtype=BF16)
    out = {}
    for kind in ("copy", "compiled"):
        fn = _make_cast(kind)
        seconds = _cuda_seconds(lambda: fn(dst, src), 10)  # noqa: B023
        out[f"{kind}_gbs"] = 3 * n / seconds / 1e9
        out[f"{kind}_ms_per_pass"] = seconds * total_elements / n * 1000
    return out


def profile_step(dit: torch.nn.Module, cap: float, size: int, cast: str, path: Path | None,
                 h2d_gbs: float) -> None:
    """torch.profiler over two steps (after two warm-up steps): where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    plan = engine_plan(dit, set_cap(cap))
    with enable_block_streaming(dit, plan, "cuda", cast=cast):
        inputs = flux_inputs(size, size)
        denoise(dit, inputs, 2)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            denoise(dit, inputs, 2)
    text = prof.key_averages().table(sort_by="device_time_total", row_limit=18,
                                     max_name_column_width=60)
    floor = plan.streamed_bytes / h2d_gbs / 1e9
    print(f"profile: cap {cap} GiB, {size}², cast {cast}, transfer floor {floor:.3f} s")
    print(text[:6000])
    if path is not None:
        path.write_text(text)


def table(rows: list[dict[str, Any]], compute: dict[int, float]) -> str:
    """s/step against the transfer floor, the compute floor (the uncapped bf16 step) and the
    larger of the two ("ratio")."""
    lines = ["| set-up | cap GiB | size | s/step | transfer floor | compute | ratio | "
             "GB streamed/step | peak alloc GiB |", "|" + "---|" * 9]
    for r in rows:
        floor, comp = r.get("transfer_floor_s") or 0.0, compute.get(r["size"], 0.0)
        bound = max(floor, comp)
        lines.append(
            f"| {r['setup']} | {r['cap_gib'] or 'none'} | {r['size']}² | {r['s_per_step']:.3f}"
            f" | {_fmt(floor)} | {_fmt(comp)} | {_fmt(bound and r['s_per_step'] / bound, 2)}"
            f" | {r.get('streamed_gb_per_step', 0):.2f} | {r['peak_alloc_gib']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--caps", default="0,12,8,6", help="GiB, 0 = uncapped")
    ap.add_argument("--sizes", default="1024,512")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--baseline-caps", default="12,8")
    ap.add_argument("--baseline-steps", type=int, default=3)
    ap.add_argument("--compile-cap", type=float, default=None, help="also time compiled blocks")
    ap.add_argument("--variants", default="", help="space-separated cap:sizes:slots:compile:cast, "
                    "e.g. 12:1024,512:3:0:compiled (cap 0 = uncapped)")
    ap.add_argument("--profile", default="", help="cap:size:cast, e.g. 12:1024:copy")
    ap.add_argument("--profile-out", type=Path, default=None)
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting rows after this")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    sizes = [int(s) for s in args.sizes.split(",")]
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "h2d_gbs": h2d_bandwidth(), "vae_peaks": vae_peaks(sizes)}
    print(json.dumps(env), flush=True)
    dit = random_flux_dit()
    env["dit_built_s"] = time.perf_counter() - t0
    h2d = env["h2d_gbs"]["registered"]
    total = sum(p.numel() for b in list(dit.blocks) + list(dit.single_blocks)
                for p in b.parameters() if p.dim() >= 2)
    env["cast"] = cast_rates(total)
    print(json.dumps(env["cast"]), flush=True)
    rows: list[dict[str, Any]] = []
    for cap in [float(c) or None for c in args.caps.split(",") if c]:
        if time.perf_counter() - t0 < args.budget_s:
            rows += ours_rows(dit, cap, sizes, args.steps, h2d)
    for spec in args.variants.split():
        cap_s, sizes_s, slots_s, comp_s, cast = spec.split(":")
        if time.perf_counter() - t0 < args.budget_s:
            rows += ours_rows(dit, float(cap_s) or None, [int(x) for x in sizes_s.split(",")],
                              args.steps, h2d, comp_s == "1", int(slots_s), cast)
    if args.profile and time.perf_counter() - t0 < args.budget_s:
        cap_s, size_s, cast = args.profile.split(":")
        profile_step(dit, float(cap_s), int(size_s), cast, args.profile_out, h2d)
    if args.compile_cap is not None and time.perf_counter() - t0 < args.budget_s - 60:
        rows += ours_rows(dit, args.compile_cap or None, sizes[:1], args.steps, h2d, True)
    compute = {r["size"]: r["s_per_step"] for r in rows if r["cap_gib"] is None
               and r["setup"] == "ours"}
    compiled = {r["size"]: r["s_per_step"] for r in rows if r["cap_gib"] is None
                and "+compile" in r["setup"]}
    for cap in [float(c) for c in args.baseline_caps.split(",") if c and float(c)]:
        if time.perf_counter() - t0 < args.budget_s - 40:
            rows.append(baseline_row(dit, cap, sizes[0], args.baseline_steps))
    print(table([r for r in rows if "+compile" not in r["setup"]], compute))
    print("compiled rows against the compiled uncapped step:")
    print(table([r for r in rows if "+compile" in r["setup"]], compiled))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
