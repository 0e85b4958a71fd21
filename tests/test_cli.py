"""The command line as a user runs it: ``python -m bot imagine`` and ``python -m bot doctor``."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.png import read_parameters

ROOT = Path(__file__).resolve().parents[1]


def run_bot(args: list[str], cwd: Path, stdin: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("DISCORD_TOKEN", None) if "DISCORD_TOKEN" not in (env or {}) else None
    full_env.pop("TELEGRAM_TOKEN", None) if "TELEGRAM_TOKEN" not in (env or {}) else None
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=120, env=full_env)


def write_dry_run_config(folder: Path, extra: str = "") -> Path:
    path = folder / "config.toml"
    path.write_text('[engine]\nbackend = "dry-run"\ndry_run_step_s = 0.0\n' + extra)
    return path


def test_imagine_writes_png_with_seed_in_parameters(tmp_path):
    write_dry_run_config(tmp_path)
    done = run_bot(["imagine", "test", "--steps", "4", "--seed", "7", "-o", "t.png"], tmp_path)
    assert done.returncode == 0, done.stderr
    params = read_parameters((tmp_path / "t.png").read_bytes())
    assert params["Seed"] == "7" and params["Steps"] == "4" and params["prompt"] == "test"
    assert "seed 7" in done.stdout
    assert (tmp_path / "data" / "bot.sqlite3").exists()


def test_imagine_reports_the_random_seed_it_used(tmp_path):
    write_dry_run_config(tmp_path)
    done = run_bot(["imagine", "a fox --ar 16:9", "--steps", "2", "-o", "fox.png"], tmp_path)
    assert done.returncode == 0, done.stderr
    params = read_parameters((tmp_path / "fox.png").read_bytes())
    assert f"seed {params['Seed']}" in done.stdout
    width, height = map(int, params["Size"].split("x"))
    assert width > height


def test_imagine_bad_input_is_one_clear_sentence(tmp_path):
    write_dry_run_config(tmp_path)
    done = run_bot(["imagine", "fox", "--steps", "500"], tmp_path)
    assert done.returncode == 2
    assert "steps" in done.stderr.lower() and "50" in done.stderr
    assert "Traceback" not in done.stderr


def test_console_run_reads_commands_and_prints_the_image_path(tmp_path):
    write_dry_run_config(tmp_path)
    done = run_bot(["run"], tmp_path, stdin="/imagine a red fox --seed 5 --steps 3\n/limits\n")
    assert done.returncode == 0, done.stderr
    saved = [line.split("saved to ", 1)[1] for line in done.stdout.splitlines()
             if "saved to " in line]
    assert len(saved) == 1
    assert read_parameters((tmp_path / saved[0]).read_bytes())["Seed"] == "5"
    assert "step 3/3" in done.stdout


def test_doctor_explains_missing_models_and_gpu(tmp_path):
    done = run_bot(["doctor"], tmp_path, env={"DISCORD_TOKEN": "secret-token-value-1234567890"})
    assert done.returncode == 1
    out = done.stdout
    assert "models folder" in out and "will be downloaded" in out
    assert "fix:" in out
    assert "secret-token-value-1234567890" not in out + done.stderr
    assert "secr…" in out


def test_doctor_passes_for_dry_run(tmp_path):
    write_dry_run_config(tmp_path)
    done = run_bot(["doctor"], tmp_path)
    assert done.returncode == 0, done.stdout
    assert "dry-run" in done.stdout and "All good." in done.stdout


def test_start_up_failure_is_one_clear_line(tmp_path):
    # No GPU here: the default flux backend cannot start, and says why without a traceback.
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = run_bot(["run"], tmp_path, stdin="")
    assert done.returncode == 1
    assert "could not start: model.device is 'cuda' but PyTorch sees no CUDA GPU" in done.stderr
    assert "doctor" in done.stderr and "Traceback" not in done.stderr


def test_doctor_shows_the_plan_for_the_card_and_warns_of_short_host_memory():
    from bot.doctor import check_plan
    from engine.config import Config
    from engine.flux.gpu_probe import GpuStatus

    card = GpuStatus(True, name="NVIDIA H100 80GB HBM3", free_gib=7.0, total_gib=79.2)
    checks = check_plan(Config(), card, host_available_gib=64.0)
    text = "\n".join(c.detail for c in checks)
    assert all(c.ok for c in checks)
    assert "preset low" in text and "device budget 7.50 GiB" in text
    assert "blocks stay on the GPU" in text and "GiB streamed per step" in text
    from engine.flux.plan_report import MEASURED_S_PER_IMAGE, plan_report

    measured = dict(MEASURED_S_PER_IMAGE["H100"])[7.5]  # the emulated 8 GB card's row
    assert (f"expected: about {measured:.1f} s per 1024² 20-step image (measured on a H100"
            in text)
    assert re.search(r"host memory needed: about 1\d\.\d GiB", text)
    short = check_plan(Config(), card, host_available_gib=8.0)
    assert [c for c in short if c.name == "host memory" and not c.ok and c.fix]
    assert [c.detail for c in checks if c.name == "float8 compute"] == [
        "on: the DiT's large matrix products run in float8"]
    other = check_plan(Config(), GpuStatus(True, name="NVIDIA GeForce RTX 3060",
                                           free_gib=11.0, total_gib=12.0), host_available_gib=32)
    assert "not measured on NVIDIA GeForce RTX 3060" in "\n".join(c.detail for c in other)
    # a card without float8 tensor cores is planned as the backend will run it: bf16 matmuls
    no_float8 = "NVIDIA GeForce RTX 3070 has no float8 tensor cores (needs compute capability 8.9+)"
    ampere = check_plan(Config(), GpuStatus(True, name="NVIDIA GeForce RTX 3070", free_gib=7.5,
                                            total_gib=8.0, float8_problem=no_float8),
                        host_available_gib=32)
    assert [(c.ok, c.detail) for c in ampere if c.name == "float8 compute"] == [
        (True, f"off: {no_float8}; the DiT computes in bf16")]
    limits = Config().limits
    planned = [c.detail for c in ampere if c.name == "memory plan"]
    bf16 = dataclasses.replace(Config().model, float8_compute=False)
    assert planned == plan_report(bf16, limits.max_pixels, "NVIDIA GeForce RTX 3070", 7.5, 0.5,
                                  limits.images_max).lines()
    assert planned != plan_report(Config().model, limits.max_pixels, "NVIDIA GeForce RTX 3070",
                                  7.5, 0.5, limits.images_max).lines()
    # "auto" without compiled blocks: bf16, and the bf16 figure expected
    from engine.flux.plan_report import MEASURED_S_PER_IMAGE_BF16

    eager = Config()
    eager.model.compile = False
    text = "\n".join(c.detail for c in check_plan(eager, card, host_available_gib=64.0))
    assert 'off: float8_compute = "auto" needs compiled blocks (model.compile)' in text
    bf16_s = dict(MEASURED_S_PER_IMAGE_BF16["H100"])[7.5]
    assert f"expected: about {bf16_s:.1f} s per 1024² 20-step image" in text
    assert "GiB free, bf16 matmuls" in text
    tiny = check_plan(Config(), GpuStatus(True, name="x", free_gib=1.5, total_gib=2.0),
                      host_available_gib=32)
    assert tiny[0].ok is False and "too small" in "\n".join(c.detail for c in tiny)


def test_config_mistakes_are_one_sentence_with_the_fix(tmp_path, monkeypatch):
    """Issue 15 rows 6 and 10: an unreadable config gave a PermissionError traceback; a typo
    in a section name got no suggestion."""
    import os

    from engine.config import ConfigError, load_config

    typo = tmp_path / "typo.toml"
    typo.write_text("[engnie]\nbackend = 'dry-run'\n")
    with pytest.raises(ConfigError, match="did you mean 'engine'"):
        load_config(typo)
    locked = tmp_path / "locked.toml"
    locked.write_text("[engine]\n")

    def refused(self, *args, **kwargs):  # what uid 10001 gets for a chmod 600 file of yours
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(locked), "read_text", refused)
    with pytest.raises(ConfigError, match=f"cannot be read by this user .uid {os.getuid()}"):
        load_config(locked)


def test_no_token_and_closed_input_says_so_and_fails(tmp_path):
    """Issue 15 row 8: `docker run` without -it and without a token exited 0 in 0.2 s."""
    write_dry_run_config(tmp_path)
    done = run_bot(["run"], tmp_path, stdin="")
    assert done.returncode == 2
    assert "standard input is closed and no chat token is set" in done.stderr
    assert "TELEGRAM_TOKEN" in done.stderr


def test_small_things_of_the_first_hour(tmp_path):
    """Issue 15 row 10: "1 steps", "about 1 s left" on a 0.3 s job, a flag given twice used
    silently, and `doctor | head` ending in a BrokenPipe traceback."""
    from bot import render

    assert render.progress(1, 2, 0.3).endswith("nearly done")
    assert render.progress(1, 20, 30.0).endswith("about 30 s left")
    assert render.steps(1) == "1 step" and render.steps(4) == "4 steps"
    write_dry_run_config(tmp_path)
    done = run_bot(["imagine", "fox --seed 3", "--seed", "4", "--steps", "1", "-o", "f.png"],
                   tmp_path)
    assert done.returncode == 0, done.stderr
    assert render.conflicts_note(["seed"]) in done.stderr
    assert read_parameters((tmp_path / "f.png").read_bytes())["Seed"] == "3"
    piped = subprocess.run(f"{sys.executable} -m bot doctor | head -1", shell=True, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr


def test_a_journal_that_cannot_be_opened_is_one_sentence_with_the_path(tmp_path):
    """Issue 15 row 7: `unable to open database file` (no path), then a second traceback from
    aiosqlite's thread."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    write_dry_run_config(tmp_path, f'database = "{blocker}/bot.sqlite3"\n')
    done = run_bot(["run"], tmp_path, stdin="")
    assert done.returncode == 1
    assert f"cannot open the job journal {blocker}/bot.sqlite3" in done.stderr
    assert "set engine.database" in done.stderr and "Traceback" not in done.stderr


def test_doctor_and_run_agree_on_a_cpu_device():
    """Issue 15 row 3: `run` suggested model.device = "cpu", and doctor then failed it."""
    from bot.doctor import check_gpu
    from engine.config import Config

    config = Config()
    config.model.device = "cpu"
    check = check_gpu(config)
    assert check.ok and "many minutes" in check.detail


def test_doctor_checks_the_telegram_token_format():
    """Issue 15 row 4: a malformed Telegram token got [ok ] from doctor."""
    from bot.doctor import check_tokens
    from engine.config import Config

    config = Config()
    config.telegram.token = "12345:not-a-token"
    bad = [c for c in check_tokens(config, None) if c.name == "telegram token"]
    assert bad and not bad[0].ok and "does not look like a bot token" in bad[0].detail
    assert "not-a-token" not in bad[0].detail  # masked, like every token shown
    config.telegram.token = "123456789:" + "A" * 35
    good = [c for c in check_tokens(config, None) if c.name == "telegram token"]
    assert good[0].ok
