"""Issue 15 row 9: card sizes and memory are one table, generated from the measured runs."""

from __future__ import annotations

from bench import hardware_table


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
    from engine.flux.plan_report import MEASURED_S_PER_IMAGE

    measured = {row["card_free_gib"]: row["s_image_1024"]
                for device, row in hardware_table.measured_rows() if "H100" in device}
    doctor = dict(MEASURED_S_PER_IMAGE["H100"])
    assert set(doctor) == set(measured)
    for card, seconds in doctor.items():
        assert round(measured[card], 2) == seconds, card
