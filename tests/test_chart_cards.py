"""The chart's lines (bench/chart_cards.py) come from the measured runs: rows a run marked as
broken are left out, and a re-measured card replaces its older point."""

from __future__ import annotations

import json
from pathlib import Path

from bench.chart_cards import line


def write(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps({"rows": rows}))
    return str(path)


def test_a_later_run_replaces_a_card_and_broken_rows_are_left_out(tmp_path: Path) -> None:
    first = write(tmp_path / "a.json", [
        {"card_free_gib": 7.5, "config": "default", "s_image_1024": 3.4},
        {"card_free_gib": 11.5, "config": "default", "s_image_1024": 9.9, "error": "no GPU"},
        {"card_free_gib": 12.0, "config": "default", "s_image_1024": 9.9, "defect": "fixed"},
        {"card_free_gib": 15.5, "config": "default", "s_image_1024": 4.7,
         "compile_failed": "self and mat2 must have the same dtype"},
        {"card_free_gib": 23.0, "config": "default", "s_image_1024": 2.9},
        {"card_free_gib": 23.0, "config": "off", "s_image_1024": 3.3},
    ])
    second = write(tmp_path / "b.json", [
        {"card_free_gib": 15.5, "config": "default", "s_image_1024": 3.0},
        {"card_free_gib": 23.0, "config": "default", "s_image_1024": 2.8},
        {"card_free_gib": 23.0, "config": "off", "s_image_1024": 3.1},
    ])
    assert line(f"{first}#default") == [(7.5, 3.4), (23.0, 2.9)]
    # #default filters only the file it follows: without it, b's "off" row joins the line
    assert line(f"{first}#default+{second}#default") == [(7.5, 3.4), (15.5, 3.0), (23.0, 2.8)]
    assert line(f"{first}#default+{second}") == [(7.5, 3.4), (15.5, 3.0), (23.0, 3.1)]


def test_within_a_file_the_later_row_of_a_card_is_kept(tmp_path: Path) -> None:
    """A card run twice in one session: the later row is the latest, as in the README table,
    even when it is the slower."""
    run = write(tmp_path / "run.json", [
        {"card_free_gib": 7.5, "config": "default", "s_image_1024": 3.3},
        {"card_free_gib": 7.5, "config": "default", "s_image_1024": 3.5},
    ])
    assert line(f"{run}#default") == [(7.5, 3.5)]


def test_a_peer_run_is_drawn_as_twenty_transformer_steps(tmp_path: Path) -> None:
    peer = write(tmp_path / "peer.json", [{"card_free_gib": 7.5, "s_step": 0.36}])
    [(card, seconds)] = line(peer)
    assert card == 7.5 and abs(seconds - 7.2) < 1e-9
