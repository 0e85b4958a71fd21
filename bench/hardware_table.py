"""The README's hardware table, generated from the emulated-card results (``bench_cards.py``).

    python -m bench.hardware_table            # print the table
    python -m bench.hardware_table --write    # put it into README.md between its markers

One table, used everywhere card sizes are named (issue 15 row 9): every row is a measured run of
the bot with its default config on an emulated card (``bench/emulated_card.py``), through
``python -m bot``. ``tests/test_readme_hardware.py`` fails when README.md and the results
disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
README = ROOT / "README.md"
START, END = "<!-- hardware-table:start -->", "<!-- hardware-table:end -->"
# What a real card of that size leaves free once the desktop and driver have their share.
CARD_OF_FREE = {5.6: 6, 7.5: 8, 9.5: 10, 11.5: 12, 15.5: 16, 23.0: 24}
MODELS_GB = 33  # the DiT, both text encoders and the VAE, as downloaded (engine/flux/model_files)


def measured_rows() -> list[tuple[str, dict]]:
    """(device, row) of the latest default-config run on each emulated card that stayed
    within it and ran compiled (an older run of the same card, or an earlier row of the same
    file, is superseded). A row with a ``defect`` (a bug found in that run and fixed since) is
    left out. The device ends in "¹" when the run's defaults (``bench_cards.defaults``) were not
    today's."""
    from bench.bench_cards import defaults

    today = defaults()
    latest: dict[float, tuple[str, str, str, dict]] = {}
    for path in RESULTS.glob("cards-*.json"):
        result = json.loads(path.read_text(encoding="utf-8"))
        mark = "" if result.get("defaults") == today else "¹"
        for row in result["rows"]:
            if row.get("config") == "default" and row.get("within_card") and not row.get("oom") \
                    and not row.get("defect") and not row.get("compile_failed"):
                key, seen = row["card_free_gib"], latest.get(row["card_free_gib"])
                # a later file, or a later row of the same file (a card run again), replaces
                if seen is None or (result["date"], path.name) >= seen[:2]:
                    device = f"{result['device']}, {result['date']}{mark}"
                    latest[key] = (result["date"], path.name, device, row)
    return [(device, row) for _, _, device, row in
            sorted(latest.values(), key=lambda item: item[3]["card_free_gib"])]


def table() -> str:
    lines = ["| card (GiB free at start) | preset auto picks | 1024², 20 steps | GPU memory "
             "(driver) | host RAM (peak) | disk | measured |",
             "|---|---|---|---|---|---|---|"]
    rows = measured_rows()
    for device, row in rows:
        free = row["card_free_gib"]
        card = CARD_OF_FREE.get(free)
        name = f"{card} GB ({free:g})" if card else f"{free:g} GiB free"
        preset = row["plan"].split(",")[0].removeprefix("preset ")
        lines.append(f"| {name} | {preset} | {row['s_image_1024']:.1f} s | "
                     f"{row['device_peak_gib']:.1f} GiB | {row['host_peak_rss_gib']:.0f} GiB | "
                     f"{MODELS_GB} GB of models | {device} |")
    lines.append("")
    lines.append("Each row is the latest run on that card (machines of one kind differ by a few "
                 "per cent), with the card emulated (another process "
                 "holds the rest of the GPU), the default config, through `python -m bot` "
                 "(`bench/bench_cards.py`; `python -m bench.hardware_table` makes this table).")
    if any(device.endswith("¹") for device, _ in rows):
        lines.append("")
        lines.append("¹ Run under older defaults (before 2026-12-07: `park_models` and "
                     "`layer_cast` off, or bf16 matmuls; docs/benchmarks.md has the "
                     "same-machine comparisons).")
    return "\n".join(lines)


def with_table(readme: str) -> str:
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"README.md has no {START} … {END} block")
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hardware_table",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args(argv)
    if args.write:
        README.write_text(with_table(README.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
