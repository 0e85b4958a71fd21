"""Image actions on an emulated card, through the user's path (``python -m bot run``, the
console): one 1024² image, then another prompt with ``--n 4``, a strong variation of the first
image (image-to-image at strength 0.7), image-to-image from the first image's file at the
default strength 0.6 (the console's ``--image``, as a picture sent in a chat) and the first
image's 2× upscale (2048², tiled).

    python bench/bench_actions.py --ckpt DIR [--cards 7.5 ...] [--batches 1 2 4] [--json F]

Per card and ``[model] batch_images``: each job's GPU seconds as the engine logs them, the
wall time from sending the line to the reply, the ratio of the four-image job to the single
image (issue 12: at most 2.8× on an 8 GB card), the variation's and the image-to-image's share
of a full image's time (issue 12: about 60% at strength 0.6), whether the 2048² upscale
finished, and the process's device peak as the driver saw it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_cards import DONE, FINISHED, PROMPT, BotProcess, device_name, fmt, run_on_card  # noqa: E402

STEPS = 20
PROMPT_N4 = PROMPT.replace("a red fox", "a grey wolf")
SAVED = re.compile(r"^\[\w+\] saved to ")


def actions(first: tuple[str, str] | None) -> list[tuple[str, str]]:
    """(name, console line) of each job; the later ones act on the first job's image
    (``first``: its id and saved file)."""
    if first is None:
        return [("one 1024²", f"/imagine {PROMPT} --seed 1 --steps {STEPS}")]
    first_id, first_file = first
    # a prompt of its own, like the first image's (the text embeddings of a prompt seen before
    # are kept: engine/flux/prompt_cache.py); the actions on the first image reuse its prompt
    # as they do for users
    return [("--n 4 1024²", f"/imagine {PROMPT_N4} --seed 5 --steps {STEPS} --n 4"),
            ("vary strong (0.7)", f"/vary {first_id} 1 strong"),
            ("image-to-image (0.6)",
             f'/imagine {PROMPT} --seed 9 --steps {STEPS} --image "{first_file}"'),
            ("upscale 2× (2048²)", f"/upscale {first_id} 1")]


def run_row(free_gib: float, ckpt: Path, batch_images: int,
            timeout: float = 400, extra: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"card_free_gib": free_gib, "batch_images": batch_images, "jobs": {}}
    extra = extra.replace("\\n", "\n")  # several lines typed on one (as bench_cards takes them)
    if extra.strip():
        row["config"] = " ".join(extra.split())  # on one line in the JSON

    def act(bot: BotProcess) -> None:
        first = run_jobs(bot, actions(None), row["jobs"], timeout)
        if first[1]:  # the others start from its image (a failed one has none: no row)
            run_jobs(bot, actions(first), row["jobs"], timeout)

    log = run_on_card(free_gib, ckpt, f"batch_images = {batch_images}\n{extra}", row, timeout,
                      act)
    jobs = row["jobs"]
    for job in jobs.values():  # the engine logs a job's GPU time just after its reply
        job.update(job_times(log, job["id"]))
    one = jobs.get("one 1024²", {}).get("gpu_s")
    if one:
        for name in ("--n 4 1024²", "vary strong (0.7)", "image-to-image (0.6)"):
            if jobs.get(name, {}).get("gpu_s"):
                jobs[name]["x_one"] = jobs[name]["gpu_s"] / one
    row["oom"] += row.pop("startup_oom")  # every one counts here
    return row


def run_jobs(bot: BotProcess, jobs: list[tuple[str, str]], out: dict[str, Any],
             timeout: float) -> tuple[str, str]:
    """Each job alone (the next is sent once the last replied); the first job's id and the
    file its (first) image was saved to ("" when it failed)."""
    done = []
    for name, line in jobs:
        sent = bot.send(line)
        at, reply = bot.wait_for(DONE, timeout)
        match = DONE.search(reply)
        assert match is not None
        ok = "✅" in reply
        saved = bot.wait_for(SAVED, 10)[1] if ok else ""  # the console's next line
        done.append((match.group(1), saved.split(" saved to ", 1)[-1]))
        out[name] = {"id": done[-1][0], "wall_s": at - sent, "ok": ok}
    return done[0]


def job_times(log: list[tuple[float, str]], job_id: str) -> dict[str, float | None]:
    """The job's GPU seconds and s/step (the median step, the first left out) as the engine
    logged them; None where it did not."""
    for _, text in log:
        match = FINISHED.search(text)
        if match and match.group(1) == job_id:
            step = match.group(4)
            return {"gpu_s": float(match.group(3)), "s_step": float(step) if step else None}
    return {"gpu_s": None, "s_step": None}


def markdown(rows: list[dict[str, Any]], device: str, command: str) -> str:
    names = ["one 1024²", "--n 4 1024²", "vary strong (0.7)", "image-to-image (0.6)",
             "upscale 2× (2048²)"]
    head = ("| card (free) | batch_images | " + " | ".join(f"{n} GPU s" for n in names)
            + " | n4 ÷ one | vary ÷ one | img2img ÷ one | device peak GiB | OOM | ok |\n"
            + "|---" * (len(names) + 8) + "|\n")
    lines = []
    for r in rows:
        jobs = r["jobs"]
        cells = [fmt(jobs.get(n, {}).get("gpu_s")) for n in names]
        ok = (not r.get("error") and r["within_card"] and not r["oom"]
              and all(jobs.get(n, {}).get("ok") for n in names))
        lines.append(
            f"| {r['card_free_gib']:.1f} GiB | {r['batch_images']} | " + " | ".join(cells)
            + f" | {fmt(jobs.get(names[1], {}).get('x_one'))} | "
            f"{fmt(jobs.get(names[2], {}).get('x_one'))} | "
            f"{fmt(jobs.get(names[3], {}).get('x_one'))} | {fmt(r.get('device_peak_gib'))} | "
            f"{r['oom']} | {'yes' if ok else 'NO'} |")
    return f"Device: {device}. Command: `{command}`\n\n" + head + "\n".join(lines) + "\n"



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--cards", type=float, nargs="*", default=[7.5])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--extra", default="",
                        help='TOML lines added under [model], e.g. "float8_compute = false"')
    args = parser.parse_args()
    device = device_name()
    rows = []
    for free in args.cards:
        for batch in args.batches:
            print(f"card {free} GiB free, batch_images {batch}…", flush=True)
            rows.append(run_row(free, args.ckpt, batch, extra=args.extra))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "log_tail"}), flush=True)
            if rows[-1].get("error"):
                print("\n".join(rows[-1]["log_tail"]), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    table = markdown(rows, device, " ".join(sys.argv))
    print(table)
    if args.md:
        args.md.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
