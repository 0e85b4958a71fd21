"""Issue 15 row 9: card sizes and memory are one table, generated from the measured runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import hardware_table
from bench.bench_cards import defaults
from engine.flux.plan_report import MEASURED_S_PER_IMAGE


def test_readme_hardware_table_is_the_one_the_results_make() -> None:
    readme = hardware_table.README.read_text(encoding="utf-8")
    assert hardware_table.with_table(readme) == readme, (
        "README.md's hardware table differs from docs/results: run "
        "`python -m bench.hardware_table --write`")


def test_rows_come_from_default_runs_within_their_card_smallest_first() -> None:
    rows = [row for _, row in hardware_table.measured_rows()]
    assert rows, "no measured card in docs/results"
    assert all(r["config"] == "default" and r["within_card"] for r in rows)
    frees = [r["card_free_gib"] for r in rows]
    assert frees == sorted(frees)
    table = hardware_table.table()
    for row in rows:  # the speed and the driver's memory of each run, as measured
        assert f"| {row['s_image_1024']:.1f} s | {row['device_peak_gib']:.1f} GiB |" in table


def test_doctor_expects_the_seconds_the_latest_run_of_each_card_measured() -> None:
    """``python -m bot doctor``'s expected seconds per image (plan_report) are the table's runs,
    so re-measuring a card means updating both."""
    measured = {row["card_free_gib"]: row["s_image_1024"]
                for device, row in hardware_table.measured_rows() if "H100" in device}
    doctor = dict(MEASURED_S_PER_IMAGE["H100"])
    assert set(doctor) == set(measured)
    for card, seconds in doctor.items():
        assert round(measured[card], 2) == seconds, card


def test_the_latest_run_of_a_card_is_its_row(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A later file replaces a card's row, and so does a later row of the same file (a card run
    twice in one session); a row from other defaults is footnoted."""
    def row(card: float, seconds: float) -> dict:
        return {"card_free_gib": card, "config": "default", "within_card": True,
                "s_image_1024": seconds, "device_peak_gib": card - 0.2,
                "plan": "preset low, DiT block streaming"}

    (tmp_path / "cards-x-2026-01-01.json").write_text(json.dumps({
        "device": "GPU A", "date": "2026-01-01", "defaults": {"old": True},
        "rows": [row(7.5, 3.6), row(11.5, 3.3)]}))
    (tmp_path / "cards-x-2026-01-02.json").write_text(json.dumps({
        "device": "GPU B", "date": "2026-01-02", "defaults": defaults(),
        "rows": [row(7.5, 3.4), row(7.5, 3.5)]}))
    monkeypatch.setattr(hardware_table, "RESULTS", tmp_path)
    rows = [(device, r["card_free_gib"], r["s_image_1024"])
            for device, r in hardware_table.measured_rows()]
    assert rows == [("GPU B, 2026-01-02", 7.5, 3.5), ("GPU A, 2026-01-01¹", 11.5, 3.3)]
