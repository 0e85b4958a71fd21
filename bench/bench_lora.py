"""LoRA styles through the user's path (issue 13): ``python -m bot run`` on an emulated card with
two styles configured, random LoRAs of rank 16 and 64 in a real FLUX layout
(``bench/make_random_lora.py``: every linear layer of every block), and 1024² 20-step images typed
into the console one after another: plain, ``--style rank16`` twice, ``--style rank64``, plain.

    python3 bench/bench_lora.py --ckpt DIR [--cards 7.5 0] [--format diffusers] [--json F]

Per card (GiB free at start, ``emulated_card.EmulatedCard``; 0: the whole card, nothing held)
and per job: the GPU seconds and s/step the engine logs, a style's per-step cost against the
plain image before it, and the switch time the backend logs ("style NAME on N layers (X ms to
switch)": the LoRA's A and B copied to the GPU). Per card: the memory plan (it sets the largest
style aside), the device peak as the driver saw it, out-of-memory errors, the host peak RSS.
Issue 13's targets: a switch <= 0.5 s; a style <= 10% per step at 8 GB. A style's first job also
pays torch.compile's graphs for blocks with a branch (a second rank, dynamic ones): that shows in
its GPU seconds, not in its s/step, which leaves the first step out; hence rank 16 twice.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_actions import job_times, run_jobs  # noqa: E402
from bench.bench_cards import PROMPT, BotProcess, device_name, fmt, run_on_card  # noqa: E402

RANKS = [16, 64]
STEPS = 20
ALPHA = 0.8
STEP_TARGET = 0.10  # a style's per-step cost, at 8 GB
SWITCH_TARGET_S = 0.5
SWITCH = re.compile(r"style (\S+) on (\d+) layers \(([\d.]+) ms to switch\)")
QUEUED = re.compile(r"job (\w+) queued")
LOADED = re.compile(r"style \S+: LoRA of rank .*")


def write_styles(folder: Path, fmt_: str, ranks: list[int], **kwargs: Any) -> dict[str, Path]:
    """A random LoRA per rank, style ``rank<N>`` (``kwargs``: make_random_lora's layout)."""
    from bench.make_random_lora import write_lora

    styles = {}
    for rank in ranks:
        started = time.perf_counter()
        path = write_lora(folder / f"rank{rank}.safetensors", rank, fmt_, seed=rank, **kwargs)
        print(f"rank {rank} ({fmt_}): {path.stat().st_size / 2**20:.0f} MiB written in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        styles[f"rank{rank}"] = path
    return styles


def styles_toml(styles: dict[str, Path], alpha: float = ALPHA) -> str:
    """The ``[styles.<name>]`` tables (after ``[model]``'s keys in bench_cards' config)."""
    return "".join(f'\n[styles.{name}]\nfile = "{path}"\nalpha = {alpha}\n'
                   for name, path in styles.items())


def jobs(styles: list[str]) -> list[tuple[str, str, str]]:
    """(name, style, console line): plain, the first style twice (the second time its graphs
    are compiled), every other style, plain again; one seed, so only the style differs."""
    first, *rest = styles
    order = [("plain", ""), (first, first), (f"{first} again", first),
             *((s, s) for s in rest), ("plain again", "")]
    return [(name, style, f"/imagine {PROMPT} --seed 1 --steps {STEPS}"
             + (f" --style {style}" if style else "")) for name, style in order]


def switch_of(log: list[tuple[float, str]], job_id: str) -> dict[str, Any]:
    """The backend's style line of the job: logged after the job was queued and before the
    next one was (each job is sent once the previous one replied)."""
    texts = [t for _, t in log]
    start = next((i for i, t in enumerate(texts) if f"job {job_id} queued" in t), None)
    if start is not None:
        for text in texts[start + 1:]:
            if QUEUED.search(text):
                break
            match = SWITCH.search(text)
            if match:
                return {"switch_ms": float(match.group(3)), "layers": int(match.group(2))}
    return {"switch_ms": None, "layers": None}


def run_card(free_gib: float, ckpt: Path, styles: dict[str, Path],
             timeout: float = 400) -> dict[str, Any]:
    row: dict[str, Any] = {"card_free_gib": free_gib, "jobs": {}}
    order = jobs(list(styles))

    def drive(bot: BotProcess) -> None:
        run_jobs(bot, [(name, line) for name, _, line in order], row["jobs"], timeout)
        row["host_peak_rss_gib"] = bot.peak_rss_gib()

    log = run_on_card(free_gib, ckpt, styles_toml(styles), row, timeout, drive)
    row["styles_loaded"] = [m.group(0) for _, t in log if (m := LOADED.search(t))]
    for name, style, _ in order:
        job = row["jobs"].get(name)
        if job is not None:  # None: the run stopped before it
            job.update(style=style, **job_times(log, job["id"]), **switch_of(log, job["id"]))
    plain = row["jobs"].get("plain", {}).get("s_step")
    for job in row["jobs"].values():
        if plain and job.get("s_step"):
            job["vs_plain"] = job["s_step"] / plain - 1
    return row


def row_ok(r: dict[str, Any]) -> bool:
    """Every job made its image, with no out-of-memory error, within the card."""
    return (not r.get("error") and r["within_card"] and not r["oom"] and not r["startup_oom"]
            and bool(r["jobs"]) and all(j["ok"] for j in r["jobs"].values()))


def targets(job: dict[str, Any]) -> str:
    """Issue 13's two targets for a styled job."""
    if not job["ok"]:
        return "FAILED"
    if not job["style"]:
        return "–"
    missed = []
    if job.get("vs_plain") is not None and job["vs_plain"] > STEP_TARGET:
        missed.append(f"step +{job['vs_plain']:.0%} > {STEP_TARGET:.0%}")
    if job.get("switch_ms") is not None and job["switch_ms"] > SWITCH_TARGET_S * 1000:
        missed.append(f"switch {job['switch_ms'] / 1000:.2f} s > {SWITCH_TARGET_S} s")
    if job.get("vs_plain") is None or job.get("switch_ms") is None:
        missed.append("not measured")
    return "; ".join(missed) or "met"


def card_label(r: dict[str, Any]) -> str:
    free = r.get("free_at_start_gib")
    if r["card_free_gib"] > 0:
        return f"{r['card_free_gib']:.1f} GiB"
    return f"whole card ({fmt(free, '.1f')} GiB free)"


def markdown(rows: list[dict[str, Any]], device: str, command: str) -> str:
    head = ("| card (free at start) | job | GPU s | s/step | step vs plain | switch ms | "
            "layers | targets (step ≤ 10% at 8 GB, switch ≤ 0.5 s) |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines, notes = [], []
    for r in rows:
        for name, job in r["jobs"].items():
            vs = job.get("vs_plain")
            lines.append(
                f"| {card_label(r)} | {name} | {fmt(job.get('gpu_s'))} | "
                f"{fmt(job.get('s_step'), '.3f')} | {'–' if vs is None else f'{vs:+.1%}'} | "
                f"{fmt(job.get('switch_ms'), '.1f')} | {job.get('layers') or '–'} | "
                f"{targets(job)} |")
        if not r["jobs"]:
            lines.append(f"| {card_label(r)} | – | – | – | – | – | – | FAILED |")
        notes.append(
            f"- {card_label(r)}: {'ok' if row_ok(r) else 'NOT OK'}; ready "
            f"{fmt(r.get('ready_s'), '.0f')} s; device peak {fmt(r.get('device_peak_gib'))} GiB "
            f"(driver; {'within' if r['within_card'] else 'ABOVE'} the card); OOM "
            f"{r['startup_oom']} at start, {r['oom']} after; host peak RSS "
            f"{fmt(r.get('host_peak_rss_gib'))} GiB; plan: {r.get('plan') or '–'}"
            + (f"; error: {r['error']}" if r.get("error") else ""))
    return (f"Device: {device}. Command: `{command}`\n\n" + head + "\n".join(lines) + "\n\n"
            + "\n".join(notes) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--cards", type=float, nargs="*", default=[7.5, 0.0],
                        help="GiB free per emulated card; 0: the whole card (nothing held)")
    parser.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    parser.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers")
    parser.add_argument("--timeout", type=float, default=400, help="s: start-up, and each job")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args(argv)
    device = device_name()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="loras-") as tmp:
        styles = write_styles(Path(tmp), args.format, args.ranks)
        for free in args.cards:
            print(f"card {free} GiB free (0: whole card)…", flush=True)
            rows.append(run_card(free, args.ckpt, styles, args.timeout))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "log_tail"}),
                  flush=True)
            if rows[-1].get("error"):
                print("\n".join(rows[-1]["log_tail"]), flush=True)
            if args.json:  # after every card: a run cut short keeps what it measured
                args.json.write_text(json.dumps(
                    {"device": device, "format": args.format, "ranks": args.ranks,
                     "alpha": ALPHA, "steps": STEPS, "rows": rows}, indent=1))
    table = markdown(rows, device, " ".join(sys.argv))
    print(table)
    if args.md:
        args.md.write_text(table)
    return 0 if all(row_ok(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
