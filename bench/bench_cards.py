"""The bot on emulated cards, through the user's path: ``python -m bot run`` with its default
config (only the model paths point at the random-weight checkpoint), the console adapter, and
``/imagine`` lines typed into it.

    python bench/bench_cards.py --ckpt DIR [--cards 5.6 7.5 ...] [--json F] [--md F]

Per card (the device's free memory at start, ``emulated_card.EmulatedCard``): the time until the
console says it is ready, then three 1024² and one 512² 20-step images of different prompts
and a re-roll of the first (1024², its prompt's text embeddings kept), queued at once (the
queue keeps the GPU busy, so the gaps between images show what the bot adds), the s/step the
engine logs, the process's device memory as the driver sees it (the holder's sample of the
device's free memory; nvidia-smi's per-process figure where it lists processes) and the bot's
host peak RSS (VmHWM). A row passes when every image arrived, nothing ran out of memory, and
the device memory stayed within what was free at start.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import make_random_flux as mrf  # noqa: E402
from bench.emulated_card import EmulatedCard, nvidia_smi_used_gib  # noqa: E402
from bench.load_bot_launcher import process_memory_kib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CARDS = [5.6, 7.5, 9.5, 11.5, 15.5, 23.0]
PROMPT = "a red fox in fresh snow at dawn, detailed photograph"
# Each image a prompt of its own, as from different users (a prompt seen before skips the text
# encoders: engine/flux/prompt_cache.py), then the first prompt again, as a re-roll
SUBJECTS = ("a red fox", "a grey wolf", "a snowy owl", "a young deer")
JOBS = [f"/imagine {PROMPT.replace('a red fox', subject)} --seed {seed} --steps 20"
        for seed, subject in enumerate(SUBJECTS[:3], start=1)] + [
    f"/imagine {PROMPT.replace('a red fox', SUBJECTS[3])} --seed 4 --steps 20 --size 512x512",
    f"/imagine {PROMPT} --seed 5 --steps 20"]
FINISHED = re.compile(r"job (\w+) finished in ([\d.]+) s \(GPU ([\d.]+) s(?:, ([\d.]+) s/step)?")
DONE = re.compile(r"^\[(\w+)\] (✅|⚠️)")  # finished, or failed (the row then fails)


def write_config(folder: Path, ckpt: Path, extra: str = "") -> Path:
    """The defaults of config.example.toml, with the model files at the checkpoint."""
    root = ckpt / mrf.REPO_DIR
    text = f"""
[engine]
database = "{folder / 'bot.sqlite3'}"
output_dir = "{folder / 'outputs'}"
max_queue_per_user = 10

[model]
models_dir = "{ckpt}"
offline = true
dit_path = "{root / mrf.DIT_FILE}"
{extra}
"""
    path = folder / "config.toml"
    path.write_text(text)
    return path


class BotProcess:
    """``python -m bot run`` with the console on a pipe; every output line timestamped."""

    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DISCORD_TOKEN", "TELEGRAM_TOKEN")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot", "run", "--config", str(config)], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.log: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            item = (time.perf_counter(), line.rstrip("\n"))
            self.log.append(item)
            self.lines.put(item)
        self.lines.put((time.perf_counter(), "<EOF>"))

    def send(self, line: str) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return time.perf_counter()

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line matching {regex.pattern!r} in {timeout:.0f} s")
            at, line = self.lines.get(timeout=left)
            if line == "<EOF>":
                raise RuntimeError("the bot exited: " + " | ".join(t for _, t in self.log[-8:]))
            if regex.search(line):
                return at, line

    def wait_logged(self, pattern: re.Pattern[str], count: int, timeout: float = 10) -> None:
        """Until ``count`` lines so far match (the engine logs a job's end just after the
        console posts it)."""
        deadline = time.monotonic() + timeout
        while (sum(bool(pattern.search(t)) for _, t in list(self.log)) < count
               and time.monotonic() < deadline):
            time.sleep(0.05)

    def peak_rss_gib(self) -> float | None:
        try:
            return process_memory_kib(self.proc.pid)[1] / 1024**2
        except (OSError, KeyError):
            return None

    def stop(self, timeout: float = 60) -> int:
        try:
            self.send("/quit")
        except (BrokenPipeError, OSError):
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def run_on_card(free_gib: float, ckpt: Path, extra: str, row: dict[str, Any], timeout: float,
                drive: Callable[[BotProcess], None]) -> list[tuple[float, str]]:
    """``python -m bot run`` on an emulated card of ``free_gib``; once it is ready, ``drive``
    sends it console lines. The ``row`` gets what every benchmark of the bot reports: ready
    time, plan, warm-up calibration, the exit code, the device peak as the driver saw it,
    out-of-memory errors before and after ready, the log's tail, and the error of a bot that
    did not start or of a ``drive`` that failed (a failed row is a result too). Returns the
    bot's timestamped log."""
    with tempfile.TemporaryDirectory() as tmp, EmulatedCard(free_gib) as card:
        row["free_at_start_gib"] = card.held["free_at_hold_gib"]
        bot = BotProcess(write_config(Path(tmp), ckpt, extra))
        started = time.perf_counter()
        try:
            ready_at, _ = bot.wait_for(r"Type /imagine", timeout)
            row["ready_s"] = ready_at - started
            row["plan"] = _first(bot.log, "FLUX memory plan: ")
            row["calibration"] = [t.split(": ", 1)[-1] for _, t in bot.log
                                  if "warm-up" in t and ("peak" in t or "ran out" in t)]
            # the bot makes images with eager blocks then: slower, and only this line says so
            row["compile_failed"] = _first(bot.log, "torch.compile failed ")
            drive(bot)
        except Exception as e:  # noqa: BLE001 - a failed row is a result too
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        finally:
            row["exit_code"] = bot.stop()
            report = card.report()
        row["device_peak_gib"] = report["peak_gib"]
        ready = next((i for i, (_, t) in enumerate(bot.log) if "Type /imagine" in t),
                     len(bot.log))
        row["startup_oom"] = sum(_oom(t) for _, t in bot.log[:ready])
        row["oom"] = sum(_oom(t) for _, t in bot.log[ready:])
        row["within_card"] = report["peak_gib"] <= row["free_at_start_gib"] + 1e-3
        row["log_tail"] = [t for _, t in bot.log[-6:]]
    return bot.log


def run_card(free_gib: float, ckpt: Path, extra: str = "", jobs: list[str] | None = None,
             timeout: float = 300) -> dict[str, Any]:
    jobs = jobs or JOBS
    row: dict[str, Any] = {"card_free_gib": free_gib, "config": extra.strip() or "default"}

    def queue_and_time(bot: BotProcess) -> None:
        sent = bot.send(jobs[0])
        for job in jobs[1:]:
            bot.send(job)
        ends = [bot.wait_for(DONE, timeout) for _ in jobs]
        done = [at for at, _ in ends]
        row["failed_jobs"] = [line for _, line in ends if "⚠️" in line]
        bot.wait_logged(FINISHED, len(jobs) - len(row["failed_jobs"]))
        row["smi_gib"] = nvidia_smi_used_gib(bot.proc.pid)
        row["host_peak_rss_gib"] = bot.peak_rss_gib()
        row.update(_timings(bot.log, sent, done))

    run_on_card(free_gib, ckpt, extra, row, timeout, queue_and_time)
    return row


def _oom(line: str) -> bool:
    return "out of" in line.lower() and "memory" in line.lower()


def _first(log: list[tuple[float, str]], marker: str) -> str | None:
    return next((t.split(marker, 1)[1] for _, t in log if marker in t), None)


def _timings(log: list[tuple[float, str]], sent: float, done: list[float]) -> dict[str, Any]:
    finished = [FINISHED.search(t) for _, t in log]
    jobs = [m for m in finished if m]
    gpu = [float(m.group(3)) for m in jobs]
    steps = [float(m.group(4)) for m in jobs if m.group(4)]
    gaps = [b - a for a, b in zip(done, done[1:], strict=False)]
    return {
        "first_image_s": done[0] - sent,
        "s_image_1024": statistics.mean(gaps[:2]) if len(gaps) >= 2 else None,
        "gpu_s_1024": statistics.mean(gpu[1:3]) if len(gpu) >= 3 else None,
        "s_step_1024": statistics.median(steps[:3]) if steps else None,
        "s_image_512": gaps[2] if len(gaps) >= 3 else None,
        # the first prompt again (its text embeddings kept): the GPU's time, comparable with
        # gpu_s_1024 (the gap after the 512² image also holds the PNG-size difference)
        "gpu_s_reroll_1024": gpu[4] if len(gpu) >= 5 else None,
        # what the bot adds between consecutive images beyond the GPU's own time
        "gap_s": (statistics.mean(g - t for g, t in zip(gaps[:2], gpu[1:3], strict=False))
                  if len(gpu) >= 3 and len(gaps) >= 2 else None),
    }


def run_seed(free_gib: float, ckpt: Path, steps: int = 3) -> dict[str, Any]:
    """The seed's set-up (plain diffsynth, its low-VRAM example) on the same emulated card,
    through ``bench_engine.py``'s measuring child; a 20-step image's time is extrapolated from
    ``steps`` timed steps (its steps are seconds long)."""
    row: dict[str, Any] = {"card_free_gib": free_gib, "config": "seed's set-up"}
    with EmulatedCard(free_gib) as card:
        command = [sys.executable, str(ROOT / "bench" / "bench_engine.py"), "--one",
                   f"baseline-low:0:1024:{steps}", "--ckpt", str(ckpt)]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        report = card.report()
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    if not results:
        row["error"] = (proc.stderr.strip().splitlines() or ["no result"])[-1][:300]
        return row
    r = results[-1]
    row.update(s_step_1024=r["s_step"], load_s=r["load_s"],
               s_image_1024=r["before_first_s"] + 20 * r["s_step"] + r["after_last_s"],
               device_peak_gib=report["peak_gib"], free_at_start_gib=report["free_at_hold_gib"])
    return row


def markdown(rows: list[dict[str, Any]], device: str, command: str) -> str:
    head = ("| card (free at start) | ready s | s/image 1024² | s/step | 512² s | GPU s: new "
            "prompt · re-roll | gap s | device peak GiB (driver) | nvidia-smi GiB | "
            "host peak RSS GiB | OOM | ok |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        ok = "NO" if not row_ok(r) else "yes, eager blocks" if r.get("compile_failed") else "yes"
        config = r["config"].replace("\n", "; ")
        lines.append(
            f"| {r['card_free_gib']:.1f} GiB ({config}) | {fmt(r.get('ready_s'), '.0f')} | "
            f"{fmt(r.get('s_image_1024'))} | {fmt(r.get('s_step_1024'), '.3f')} | "
            f"{fmt(r.get('s_image_512'))} | {fmt(r.get('gpu_s_1024'))} · "
            f"{fmt(r.get('gpu_s_reroll_1024'))} | "
            f"{fmt(r.get('gap_s'), '.3f')} | "
            f"{fmt(r.get('device_peak_gib'))} | {fmt(r.get('smi_gib'))} | "
            f"{fmt(r.get('host_peak_rss_gib'))} | {r['oom']} | {ok} |")
    return (f"Device: {device}. Command: `{command}`\n\n" + head + "\n".join(lines) + "\n")


def fmt(value: float | None, spec: str = ".2f") -> str:
    """A figure for a table, "–" where it was not measured."""
    return "–" if value is None else format(value, spec)


def device_name() -> str:
    """The GPU's name from nvidia-smi: a CUDA context here would sit outside the emulated card."""
    return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip().splitlines()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--cards", type=float, nargs="*", default=CARDS)
    parser.add_argument("--extra", default="", help="TOML lines added under [model]")
    parser.add_argument("--seed-cards", type=float, nargs="*", default=[],
                        help="also time the seed's set-up on these cards (3 steps, extrapolated)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    device = device_name()
    rows = []
    for free in args.cards:
        print(f"card {free} GiB free…", flush=True)
        row = run_card(free, args.ckpt, args.extra.replace("\\n", "\n"))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
        if row.get("error"):
            print("\n".join(row["log_tail"]), flush=True)
        if args.json:  # after every row: a run cut short keeps what it measured
            args.json.write_text(json.dumps({"device": device, "defaults": defaults(),
                                             "rows": rows}, indent=1))
    seed_rows = []
    for free in args.seed_cards:
        print(f"seed's set-up, card {free} GiB free…", flush=True)
        seed_rows.append(run_seed(free, args.ckpt))
        print(json.dumps(seed_rows[-1]), flush=True)
    table = markdown(rows, device, " ".join(sys.argv))
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "defaults": defaults(),
                                         "rows": rows, "seed": seed_rows}, indent=1))
    if args.md:
        args.md.write_text(table)
    return 0 if all(row_ok(r) for r in rows) else 1


def defaults() -> dict[str, bool]:
    """The model options whose defaults changed between runs (the ``default`` config's rows
    were made with these): ``hardware_table`` marks rows made under other defaults."""
    from engine.config import ModelSection

    model = ModelSection()
    return {"park_models": model.park_models, "layer_cast": model.layer_cast,
            "float8_compute": model.float8_compute}


def row_ok(r: dict[str, Any]) -> bool:
    return (not r.get("error") and not r.get("failed_jobs") and r["within_card"]
            and not r["oom"])


if __name__ == "__main__":
    sys.exit(main())
