"""Seconds per 1024² image against card size, one line per set-up, from the benchmarks' JSON.

    python bench/chart_cards.py OUT.png LABEL=FILE.json[#CONFIG][+FILE.json[#CONFIG]...] ...

One line may join several runs (``+``; ``#CONFIG`` applies to the file it follows): a later
file's point replaces an earlier one's at the same card, as a re-measured card replaces its older
row, and within a file a later row replaces an earlier one (``hardware_table`` does the same).
Each FILE holds ``rows`` with ``card_free_gib`` and ``s_image_1024`` (``bench_cards.py``'s
output; ``#CONFIG`` keeps the rows of that ``config`` only, e.g. ``#default``; a row with an
``error``, a ``defect`` (a bug found in that run and fixed since) or a ``compile_failed`` (eager
blocks) is left out), or ``s_step`` (``bench_peer_diffusers.py``'s, the transformer alone: drawn as
20 × s_step, which leaves out its text encoders and VAE and so favours it). matplotlib is needed
here only (``pip install matplotlib``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def series(path: Path, config: str = "") -> list[tuple[float, float]]:
    data = json.loads(path.read_text())
    points = []
    for row in data.get("rows", []):
        if row.get("error") or row.get("defect") or row.get("compile_failed") \
                or (config and row.get("config") != config):
            continue
        seconds = row.get("s_image_1024")
        if seconds is None and row.get("s_step") is not None:
            seconds = 20 * row["s_step"]
        if seconds is not None:
            points.append((row["card_free_gib"], seconds))
    return points  # in the file's order: the latest run of a card comes last


def line(files: str) -> list[tuple[float, float]]:
    """The points of ``FILE.json[#CONFIG][+FILE.json...]``: a later file's point replaces an
    earlier one's at the same card."""
    by_card: dict[float, float] = {}
    for spec in files.split("+"):
        path, _, config = spec.rpartition("#") if "#" in spec else (spec, "", "")
        by_card.update(series(Path(path), config))
    return sorted(by_card.items())


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for spec in argv[1:]:
        label, _, files = spec.partition("=")
        points = line(files)
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=label)
        for x, y in points:
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("card: GPU memory free at start (GiB)")
    ax.set_ylabel("seconds per 1024² image, 20 steps (log)")
    ax.set_title("FLUX.1-dev on small cards, H100 (the legend says how each was measured)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(argv[0])
    print(f"wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
