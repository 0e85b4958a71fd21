"""Float8 compute (engine/flux/float8_compute.py) against bf16, on the resident DiT alone.

A FluxDiT with random bf16 weights is built on the GPU (no checkpoint), and diffsynth's denoising
loop (``model_fn_flux_image`` + the FLUX.1 scheduler, as in bench_streaming.py) is timed:

    bf16 eager, bf16 with the blocks compiled, then the same DiT converted to float8 compute,
    eager and compiled; the DiT output's relative error against bf16 for the same input
    (||y8 - y|| / ||y||); and a torch.profiler summary of one compiled step of each, grouped
    into matmuls, attention, fused elementwise kernels and the rest.

    python3 bench/bench_float8.py --size 1024 --steps 6 --json $OUT/float8.json \\
        --profile-out $OUT/float8-profile.txt

The error is measured on random weights: real checkpoints have outlier channels that make
activation scaling harder, so treat it as a check of the arithmetic, not a quality verdict.
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

from bench.bench_streaming import (  # noqa: E402
    BF16,
    denoise,
    flux_inputs,
    random_flux_dit,
)
from engine.flux.float8_compute import (  # noqa: E402
    Float8Linear,
    check_float8_matmul,
    enable_float8_compute,
)
from engine.flux.pipeline import compile_dit_blocks, uncompile_dit_blocks  # noqa: E402

GROUPS = (  # profiler kernel names -> what they are (first match wins)
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    # one group for bf16 and float8 GEMMs: cuBLASLt's Hopper kernels (nvjet_*) carry no dtype
    # in their names; comparing a bf16 row with its float8 row tells what float8 saved
    ("matmul", ("scaled_mm", "gemm", "nvjet", "cutlass", "xmma", "matmul", "mm")),
    ("fused elementwise (Triton)", ("triton",)),
    ("copies and casts", ("copy", "cast", "memcpy", "to_copy")),
)


def dit_output(dit: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """One DiT call at the middle of the schedule (timestep 500)."""
    from diffsynth.pipelines.flux_image import model_fn_flux_image

    timestep = torch.tensor([500.0], device=inputs["latents"].device, dtype=BF16)
    with torch.no_grad():
        return model_fn_flux_image(dit=dit, **inputs, timestep=timestep).float()


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def layer_error_floor(device: str, tokens: int = 1024, width: int = 3072) -> dict[str, float]:
    """Relative error of ONE float8 linear layer (Gaussian activations, weights of std 0.02)
    against bf16: from quantizing the weights alone, the activations alone, and both. e4m3's
    three mantissa bits set this floor whatever the scaling; a DiT stacks 57 blocks of them."""
    from engine.flux.float8_compute import Float8Linear, quantize_rows

    g = torch.Generator(device).manual_seed(0)
    linear = torch.nn.Linear(width, width, device=device).to(BF16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(width, width, generator=g, device=device) * 0.02)
        x = torch.randn(tokens, width, generator=g, device=device).to(BF16)
        exact = x.float() @ linear.weight.float().t()
        wq, ws = quantize_rows(linear.weight)
        xq, xs = quantize_rows(x)
        weights_only = x.float() @ (wq.float() * ws).t()
        activations_only = (xq.float() * xs) @ linear.weight.float().t()
        both = Float8Linear.from_linear(linear)(x).float() - linear.bias.float()
    return {name: rel_error(value, exact) for name, value in (
        ("weights only", weights_only), ("activations only", activations_only), ("both", both))}


def time_steps(dit: torch.nn.Module, inputs: dict[str, Any], steps: int) -> dict[str, float]:
    times: list[float] = []
    denoise(dit, inputs, steps, times)
    return {"s_per_step": statistics.median(times[1:]), "step1_s": times[0]}


def profile_summary(dit: torch.nn.Module, inputs: dict[str, Any],
                    label: str) -> tuple[dict[str, float], str]:
    """Device milliseconds per group for one step (after a warm step), and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    denoise(dit, inputs, 1)
    activities = [ProfilerActivity.CPU]
    if inputs["latents"].is_cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        denoise(dit, inputs, 1)
    events = prof.key_averages()
    groups: dict[str, float] = {}
    cuda = inputs["latents"].is_cuda
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    for e in events:
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue  # kernels only: an aten op's device time is its kernels' time again
        ms = getattr(e, key, 0) / 1000
        if ms <= 0:
            continue
        name = e.key.lower()
        group = next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + ms
    table = events.table(sort_by=key, row_limit=25, max_name_column_width=90)
    groups["sum of kernels"] = sum(groups.values())
    return groups, f"## {label}\n{table}"


def measure(dit: torch.nn.Module, inputs: dict[str, Any], steps: int, label: str,
            reference: torch.Tensor | None, mode: str | None,
            profiles: list[str]) -> dict[str, Any]:
    """One row; ``mode`` None = eager, else the torch.compile mode of the blocks."""
    compile_blocks = mode is not None
    label += "" if mode is None else "+compile" + ("" if mode == "default" else f"({mode})")
    row: dict[str, Any] = {"setup": label}
    started = time.perf_counter()
    if compile_blocks:
        torch._dynamo.reset()  # a fresh compile per row: its cost is part of the row
        compile_dit_blocks(dit, mode)
        denoise(dit, inputs, 1)  # the compile happens here
        row["compile_s"] = time.perf_counter() - started
    row.update(time_steps(dit, inputs, steps))
    out = dit_output(dit, inputs)
    row["rel_error_vs_bf16"] = 0.0 if reference is None else rel_error(out, reference)
    row["groups_ms"], text = profile_summary(dit, inputs, label)
    profiles.append(text)
    if inputs["latents"].is_cuda:
        row["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    if compile_blocks:
        uncompile_dit_blocks(dit)
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    groups = sorted({g for r in rows for g in r["groups_ms"]})
    head = "| set-up | s/step | compile s | rel. error vs bf16 | " + " | ".join(
        f"{g} ms" for g in groups) + " |"
    lines = [head, "|" + "---|" * (4 + len(groups))]
    for r in rows:
        cells = [r["setup"], f"{r['s_per_step']:.4f}", f"{r.get('compile_s', 0):.1f}",
                 f"{r['rel_error_vs_bf16']:.4f}"]
        cells += [f"{r['groups_ms'].get(g, 0):.1f}" for g in groups]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true", help="eager rows only")
    ap.add_argument("--modes", default="default",
                    help="torch.compile modes to time, comma-separated (e.g. "
                    "default,max-autotune-no-cudagraphs)")
    ap.add_argument("--blocks", default="", help="double,single: a truncated DiT (CPU checks)")
    ap.add_argument("--layer-only", action="store_true",
                    help="only the one-layer error floor (runs on a CPU in seconds)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile-out", type=Path, default=None)
    args = ap.parse_args(argv)
    why_not = check_float8_matmul(args.device)
    if why_not:
        print(f"float8 compute unavailable: {why_not}")
        return 1
    floor = layer_error_floor(args.device)
    print(f"one float8 linear layer, relative error vs bf16: {floor}", flush=True)
    if args.layer_only:
        return 0
    double, single = (int(x) for x in args.blocks.split(",")) if args.blocks else (None, None)
    dit = random_flux_dit(dtype=BF16, device=args.device, draw_on=args.device,
                          double_blocks=double, single_blocks=single)
    inputs = flux_inputs(args.size, args.size, device=args.device)
    reference = dit_output(dit, inputs)
    profiles: list[str] = []
    modes: list[str | None] = [None]
    if not args.no_compile:
        modes += args.modes.split(",")
    rows = [measure(dit, inputs, args.steps, "bf16", None, m, profiles) for m in modes]
    report = enable_float8_compute(dit)
    rows += [measure(dit, inputs, args.steps, "float8", reference, m, profiles) for m in modes]
    if not args.no_compile:  # the same with the slower, fully fp32-accumulated kernel
        for layer in dit.modules():
            if isinstance(layer, Float8Linear):
                layer.fast_accum = False
        rows.append(measure(dit, inputs, args.steps, "float8(fp32 accumulation)", reference,
                            modes[1], profiles))
    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
           "torch": torch.__version__, "size": args.size, "steps": args.steps,
           "float8": report.describe()}
    print(json.dumps(env))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    if args.profile_out:
        args.profile_out.write_text("\n\n".join(profiles))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
