"""The GPU benchmarks that drive the bot (bench/bench_cards.py, bench/bench_actions.py,
bench/bench_lora.py) run here
on the dry-run backend, with the emulated card replaced (no GPU): every console line they send
is one the bot understands, and their rows and tables come out filled. A GPU session's minutes
are too few to find such slips there."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench_actions, bench_cards, bench_lora


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
    assert row["gpu_s_reroll_1024"] > 0  # the fifth image
    assert bench_cards.row_ok(row) and "| 7.5 GiB (default) |" in bench_cards.markdown(
        [row], "cpu", "test")


def test_the_actions_benchmark_runs_every_action_on_the_first_image(dry_run_card, tmp_path,
                                                                    monkeypatch) -> None:
    written: list[str] = []
    write = bench_cards.write_config

    def recording(folder: Path, ckpt: Path, extra: str = "") -> Path:
        written.append(extra)
        return write(folder, ckpt, extra)

    monkeypatch.setattr(bench_cards, "write_config", recording)
    row = bench_actions.run_row(7.5, tmp_path, batch_images=2, timeout=60,
                                extra="float8_compute = true")
    # the extra [model] lines reach the bot's config beside batch_images, and the row names them
    assert written == ["batch_images = 2\nfloat8_compute = true"]
    assert row["config"] == "float8_compute = true"
    jobs = row["jobs"]
    assert not row.get("error") and set(jobs) == {"one 1024²", "--n 4 1024²",
                                                  "vary strong (0.7)", "image-to-image (0.6)",
                                                  "upscale 2× (2048²)"}
    assert all(job["ok"] and job["gpu_s"] > 0 for job in jobs.values())
    # the dry run sleeps per step: four images take about four times one, and image-to-image
    # at 0.6 runs 12 of the 20 steps
    assert 3 < jobs["--n 4 1024²"]["x_one"] < 5
    assert 0.4 < jobs["image-to-image (0.6)"]["x_one"] < 0.8
    assert "| 7.5 GiB | 2 |" in bench_actions.markdown([row], "cpu", "test")


def test_a_bot_that_does_not_start_is_a_failed_row_not_a_crash(dry_run_card, tmp_path) -> None:
    """What issue 10 was about: a card the bot cannot start on is a result, recorded with its
    error and the log's tail, and the benchmark goes on to its next card."""
    row = bench_cards.run_card(7.5, tmp_path, extra='preset = "nonsense"', timeout=60)
    assert "the bot exited" in row["error"] and row["exit_code"] != 0
    assert not bench_cards.row_ok(row) and any("preset" in t for t in row["log_tail"])
    assert "| NO |" in bench_cards.markdown([row], "cpu", "test")


def test_a_run_whose_compile_fell_back_to_eager_says_so_in_its_row(dry_run_card,
                                                                    tmp_path) -> None:
    """A run that fell back to eager blocks is slower with nothing else wrong (the 16 GB card
    on 2026-12-07, docs/benchmarks.md): its row says so. A config of several lines stays on
    one line of the table."""
    row = bench_cards.run_card(7.5, tmp_path, extra="compile = true\nprompt_cache = 0",
                               timeout=60)
    assert row["compile_failed"] is None  # the dry-run backend compiles nothing
    table = bench_cards.markdown([row], "cpu", "test")
    assert "| 7.5 GiB (compile = true; prompt_cache = 0) |" in table and table.endswith("| yes |\n")
    row["compile_failed"] = "(RuntimeError: self and mat2 must have the same dtype); running eager"
    assert bench_cards.markdown([row], "cpu", "test").endswith("| yes, eager blocks |\n")


def test_the_lora_benchmark_runs_plain_and_styled_jobs_in_order(dry_run_card, tmp_path) -> None:
    """Its ``[styles]`` tables load, every ``--style`` line is accepted, and each job's GPU time
    and s/step are read back (the dry run switches no LoRA: no switch line to read)."""
    styles = bench_lora.write_styles(tmp_path, "diffusers", [4, 8], dim=16, double=1, single=1)
    row = bench_lora.run_card(7.5, tmp_path, styles, timeout=60)
    jobs = row["jobs"]
    assert not row.get("error") and row["exit_code"] == 0
    assert list(jobs) == ["plain", "rank4", "rank4 again", "rank8", "plain again"]
    assert [job["style"] for job in jobs.values()] == ["", "rank4", "rank4", "rank8", ""]
    assert all(job["ok"] and job["gpu_s"] > 0 and job["s_step"] > 0 for job in jobs.values())
    assert all(abs(job["vs_plain"]) < 0.5 for job in jobs.values())  # the dry run: same steps
    assert all(job["switch_ms"] is None for job in jobs.values())
    table = bench_lora.markdown([row], "cpu", "test")
    assert bench_lora.row_ok(row) and "| 7.5 GiB | rank4 again |" in table
    assert "not measured" in table  # no switch line: said, not taken for a met target


def test_the_lora_benchmark_reads_the_switch_line_the_backend_logs(tmp_path, monkeypatch,
                                                                    caplog) -> None:
    """The FLUX backend's own style line (on the CPU test's fake pipeline), in a log shaped as
    the bot's, gives each job its switch time; a plain job between gets none."""
    pytest.importorskip("diffsynth.models.flux_dit")
    from engine.request import ImageRequest
    from tests.test_lora_styles import style_backend

    backend, _ = style_backend(tmp_path, monkeypatch)
    backend.load()
    request = ImageRequest(prompt="a fox", seed=1, steps=2, width=256, height=256, guidance=3.5)
    with caplog.at_level("INFO", logger="engine.flux.backend"):
        backend.generate(request.with_changes(style="ink"), lambda i, n: None)
    backend.close()
    [line] = [r.getMessage() for r in caplog.records if "to switch" in r.getMessage()]
    log = [(0.0, "job a1 queued for console:1 (position 1)"), (0.1, "INFO " + line),
           (0.2, "job a1 finished in 1.00 s (GPU 1.00 s, 0.050 s/step)"),
           (0.3, "job b2 queued for console:1 (position 1)"),
           (0.4, "job b2 finished in 1.00 s (GPU 1.00 s, 0.050 s/step)")]
    got = bench_lora.switch_of(log, "a1")
    assert got["layers"] == 10 * 3 + 3 * 4 and got["switch_ms"] >= 0  # TinyDiT's layers
    assert bench_lora.switch_of(log, "b2") == {"switch_ms": None, "layers": None}
