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
