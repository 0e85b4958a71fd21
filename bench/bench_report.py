"""The report half of ``bench_engine.py``: floors arithmetic and the markdown table (no torch)."""

from __future__ import annotations

import datetime as dt
from typing import Any

DIM, DOUBLE, SINGLE, TEXT_TOKENS = 3072, 19, 38, 512


def flops_per_step(size: int, text_tokens: int = TEXT_TOKENS) -> tuple[float, float]:
    """(linear, attention) FLOPs of one FLUX DiT step at ``size``² (one image, no CFG).

    Linear layers per token and block: a double block runs qkv 3d², proj d², mlp 8d² on each
    stream's own tokens; a single block runs linear1 7d² and linear2 5d² on all tokens; so 12d²
    multiply-adds per token per block either way. Attention: QKᵀ and PV, 2·N²·d each.
    The modulation layers act on one vector per block and are left out.
    """
    tokens = (size // 16) ** 2 + text_tokens
    blocks = DOUBLE + SINGLE
    linear = 2 * 12 * DIM**2 * tokens * blocks
    attention = 2 * 2 * tokens**2 * DIM * blocks
    return float(linear), float(attention)


def floors(row: dict[str, Any], rates: dict[str, Any]) -> tuple[float | None, float | None]:
    """(compute floor, transfer floor) in seconds per step."""
    compute = transfer = None
    if rates.get("matmul_tflops"):
        compute = sum(flops_per_step(row["size"])) / (rates["matmul_tflops"] * 1e12)
    if rates.get("h2d_pinned_gbs") and "dit_streamed_bytes" in row:
        transfer = row["dit_streamed_bytes"] / (rates["h2d_pinned_gbs"] * 1e9)
    return compute, transfer


def baseline_for(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The baseline row measured at the same size: the seed's set-up at the same cap, or, for
    an uncapped row, everything resident."""
    want = "baseline-low" if row.get("cap") else "baseline-resident"
    found = [o for o in rows if o.get("setup") == want and o.get("size") == row.get("size")
             and o.get("cap") == row.get("cap") and "s_step" in o]
    # prefer the same step count, then the same image of the run (the warm one when two)
    found.sort(key=lambda o: (o["steps"] != row["steps"], o["image"] != row["image"]))
    return found[0] if found else None


def one_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['spec']}: FAILED {r['error']}"
    return (f"{r['setup']} cap={_cap(r)} {r['size']}² x{r['steps']} img {r['image']}: "
            f"{r['s_image']:.2f} s/image, {r['s_step']:.3f} s/step, "
            f"peak {r['peak_alloc_gib']:.1f} GiB, RSS {r['host_peak_rss_gib']:.1f} GiB")


def _cap(r: dict[str, Any]) -> str:
    return f"{r['cap']:g} GiB" if r.get("cap") else "none"


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "—" if value is None else format(value, fmt)


HEADER = ("| set-up | preset | cap | size | steps | img | load s | compile s | s/image | s/step | step 1 s "
          "| before 1st s | after last s | peak alloc GiB | peak reserved GiB | device used GiB "
          "| host peak RSS GiB | DiT streamed GiB | compute floor s/step | transfer floor s/step "
          "| s/step ÷ baseline | s/image ÷ baseline |")


def table_row(r: dict[str, Any], rows: list[dict[str, Any]], rates: dict[str, Any]) -> str:
    if "error" in r:
        return f"| `{r['spec']}` | failed: {r['error']} |" + " |" * 20
    compute, transfer = floors(r, r.get("rates", rates))  # a merged report keeps each run's rates
    base = baseline_for(r, rows) if r["setup"].startswith("ours") else None
    ratio_step = r["s_step"] / base["s_step"] if base else None
    same_steps = base is not None and base["steps"] == r["steps"]
    ratio_image = r["s_image"] / base["s_image"] if same_steps else None  # type: ignore[index]
    cells = [r["setup"], r["preset"], _cap(r), f"{r['size']}²", str(r["steps"]), r["image"],
             _f(r["load_s"], ".1f"), _f(r.get("compile_s"), ".1f"), _f(r["s_image"]),
             _f(r["s_step"], ".3f"),
             _f(r["step1_s"], ".3f"), _f(r["before_first_s"]), _f(r["after_last_s"]),
             _f(r["peak_alloc_gib"], ".1f"), _f(r["peak_reserved_gib"], ".1f"),
             _f(r.get("device_used_gib"), ".1f"), _f(r["host_peak_rss_gib"], ".1f"),
             _f(r.get("dit_streamed_gib"), ".1f"), _f(compute, ".3f"), _f(transfer, ".3f"),
             _f(ratio_step), _f(ratio_image)]
    return "| " + " | ".join(cells) + " |"


def markdown(rows: list[dict[str, Any]], rates: dict[str, Any], command: str,
             date: str | None = None) -> str:
    now = date or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Benchmark run", "",
        f"- date: {now}",
        f"- device: {rates.get('device', '?')}; torch {rates.get('torch', '?')} (CUDA "
        f"{rates.get('cuda', '?')}), diffsynth {rates.get('diffsynth', '?')}, transformers "
        f"{rates.get('transformers', '?')}",
        f"- command: `{command}`",
        f"- measured rates: bf16 matmul {_f(rates.get('matmul_tflops'), '.0f')} TFLOP/s; pinned "
        f"host→device {_f(rates.get('h2d_pinned_gbs'), '.1f')} GB/s; diffsynth's CPU-float8 layer "
        f"copy {_f(rates.get('diffsynth_copy_gbs'), '.2f')} GB/s of float8 weights",
        f"- compute floor per step: {sum(flops_per_step(1024)) / 1e12:.1f} TFLOP at 1024², "
        f"{sum(flops_per_step(512)) / 1e12:.1f} TFLOP at 512², over the measured matmul rate; "
        "transfer floor: the DiT bytes left in host memory (streamed every step) over the "
        "pinned host→device rate",
        "", HEADER, "|" + "---|" * 22,
    ]
    lines += [table_row(r, rows, rates) for r in rows]
    overhead = [r for r in rows if "engine_s" in r]
    if overhead:
        lines += ["", "Whole-bot overhead (the same job called directly vs through the Engine: "
                      "queue, worker thread, events, PNG encoding, journal):", ""]
        for r in overhead:
            lines.append(f"- {r['setup']} {r['size']}² x{r['steps']}: direct {r['direct_s']:.2f} s, "
                         f"engine {r['engine_s']:.2f} s, overhead {r['engine_overhead_s']:+.2f} s")
    return "\n".join(lines) + "\n"
