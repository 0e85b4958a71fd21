"""The GPU benchmarks that drive the bot (bench/bench_cards.py, bench/bench_actions.py) run here
on the dry-run backend, with the emulated card replaced (no GPU): every console line they send
is one the bot understands, and their rows and tables come out filled. A GPU session's minutes
are too few to find such slips there."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench_actions, bench_cards


class NoCard:
    """Stands in for EmulatedCard: the GPU's free memory is not what these tests check."""

    held = {"free_at_hold_gib": 7.5}

    def __enter__(self) -> NoCard:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def report(self) -> dict[str, float]:
        return {"peak_gib": 1.0}


@pytest.fixture
def dry_run_card(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = bench_cards.write_config

    def dry_run_config(folder: Path, ckpt: Path, extra: str = "") -> Path:
        path = plain(folder, ckpt, extra)
        path.write_text(path.read_text().replace("[engine]\n", '[engine]\nbackend = "dry-run"\n'))
        return path

    monkeypatch.setattr(bench_cards, "EmulatedCard", lambda free_gib: NoCard())
    monkeypatch.setattr(bench_cards, "write_config", dry_run_config)
    monkeypatch.setattr(bench_cards, "nvidia_smi_used_gib", lambda pid: None)


def test_the_cards_benchmark_queues_its_images_and_times_them(dry_run_card, tmp_path) -> None:
    row = bench_cards.run_card(7.5, tmp_path, timeout=60)
    assert not row.get("error") and row["exit_code"] == 0 and row["failed_jobs"] == []
    assert row["s_image_1024"] > 0 and row["s_step_1024"] > 0 and row["s_image_512"] > 0
    assert bench_cards.row_ok(row) and "| 7.5 GiB (default) |" in bench_cards.markdown(
        [row], "cpu", "test")


def test_the_actions_benchmark_runs_every_action_on_the_first_image(dry_run_card,
                                                                    tmp_path) -> None:
    row = bench_actions.run_row(7.5, tmp_path, batch_images=2, timeout=60)
    jobs = row["jobs"]
    assert not row.get("error") and set(jobs) == {"one 1024²", "--n 4 1024²",
                                                  "vary strong (0.7)", "upscale 2× (2048²)"}
    assert all(job["ok"] and job["gpu_s"] > 0 for job in jobs.values())
    # the dry run sleeps per step: four images take about four times one
    assert 3 < jobs["--n 4 1024²"]["x_one"] < 5
    assert "| 7.5 GiB | 2 |" in bench_actions.markdown([row], "cpu", "test")


def test_a_bot_that_does_not_start_is_a_failed_row_not_a_crash(dry_run_card, tmp_path) -> None:
    """What issue 10 was about: a card the bot cannot start on is a result, recorded with its
    error and the log's tail, and the benchmark goes on to its next card."""
    row = bench_cards.run_card(7.5, tmp_path, extra='preset = "nonsense"', timeout=60)
    assert "the bot exited" in row["error"] and row["exit_code"] != 0
    assert not bench_cards.row_ok(row) and any("preset" in t for t in row["log_tail"])
    assert "| NO |" in bench_cards.markdown([row], "cpu", "test")
