"""Placeholder images, PNG metadata, the fair queue and the config defaults."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from engine.backends.dry_run import DryRunBackend, placeholder_image
from engine.config import Config, ConfigError, config_from_dict, load_config
from engine.fair_queue import FairQueue
from engine.png import encode_png, read_parameters
from tests.conftest import make_request

ROOT = Path(__file__).resolve().parents[1]


def test_placeholder_is_deterministic_per_seed_and_sized():
    a = placeholder_image(make_request(seed=1, width=512, height=256))
    b = placeholder_image(make_request(seed=1, width=512, height=256))
    c = placeholder_image(make_request(seed=2, width=512, height=256))
    assert a.size == (512, 256)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_dry_run_emits_every_step():
    steps = []
    [image] = DryRunBackend().generate(make_request(steps=3), lambda i, n: steps.append((i, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)] and image.size == (256, 256)


def test_dry_run_makes_n_images_and_starts_from_an_image(tmp_path):
    request = make_request(seed=5, steps=2).with_changes(count=3)
    steps = []
    images = DryRunBackend().generate(request, lambda i, n: steps.append((i, n)))
    assert [im.tobytes() for im in images] == [
        placeholder_image(request.one(i)).tobytes() for i in range(3)]
    assert steps == [(i, 6) for i in range(1, 7)]
    start = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(start)
    vary = make_request(seed=9, steps=10).with_changes(init_image=str(start), strength=0.3)
    steps.clear()
    [image] = DryRunBackend().generate(vary, lambda i, n: steps.append((i, n)))
    assert steps[-1] == (3, 3)  # ⌈10 × 0.3⌉ steps
    assert image.getpixel((0, 0))[0] > 150  # mostly the red it started from


def test_png_parameters_chunk_round_trip():
    request = make_request("a fox, in snow: 🦊", seed=4294967295, steps=20)
    png = encode_png(placeholder_image(request), request, "majicflus_v134")
    params = read_parameters(png)
    assert params["prompt"] == "a fox, in snow: 🦊"
    assert params["Seed"] == "4294967295" and params["Size"] == "256x256"
    assert params["Model"] == "majicflus_v134" and params["Distilled CFG Scale"] == "3.5"
    assert Image.open(io.BytesIO(png)).text["parameters"].startswith("a fox")


def test_fair_queue_serves_owners_in_turn():
    q: FairQueue[str] = FairQueue()
    for item in ["a1", "a2", "a3"]:
        q.push("a", item)
    q.push("b", "b1")
    q.push("c", "c1")
    assert list(q.ordered()) == ["a1", "b1", "c1", "a2", "a3"]
    assert [q.pop() for _ in range(5)] == ["a1", "b1", "c1", "a2", "a3"]
    assert q.pop() is None and len(q) == 0


def test_fair_queue_charges_a_job_its_images():
    """A grid of four is four turns: b's and c's single images go before a's next job."""
    sizes = {"a4": 4, "a1": 1, "b1": 1, "b2": 1, "c1": 1, "c2": 1, "c3": 1, "d1": 1}
    q: FairQueue[str] = FairQueue(weight=sizes.__getitem__)
    for item in ["a4", "a1"]:
        q.push("a", item)
    for item in ["b1", "b2"]:
        q.push("b", item)
    for item in ["c1", "c2", "c3"]:
        q.push("c", item)
    expected = ["a4", "b1", "c1", "b2", "c2", "c3", "a1"]
    assert list(q.ordered()) == expected
    assert [q.pop() for _ in range(7)] == expected
    q = FairQueue(weight=sizes.__getitem__)
    q.push("a", "a4")
    q.push("a", "a1")
    q.push("b", "b1")
    assert q.pop() == "a4"
    q.push("d", "d1")  # a newcomer starts level with b, who has had nothing yet; a had four
    assert list(q.ordered()) == ["b1", "d1", "a1"]


def test_example_config_equals_the_built_in_defaults():
    data = tomllib.loads((ROOT / "config.example.toml").read_text())
    assert config_from_dict(data) == Config()


def test_missing_default_config_means_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config() == Config()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("data, message", [
    ({"engine": {"backend": "gpu"}}, "engine.backend = 'gpu'"),
    ({"limits": {"steps_max": "50"}}, "limits.steps_max = '50' must be a whole number"),
    ({"engine": {"bakend": "flux"}}, "unknown setting 'engine.bakend'"),
    ({"model": {"preset": "huge"}}, "auto, low, balanced, max"),
])
def test_bad_config_names_key_value_and_allowed(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(data)


def test_tokens_from_environment_win(monkeypatch):
    cfg = config_from_dict({"discord": {"token": "from-file"}})
    assert cfg.discord_token == "from-file"
    monkeypatch.setenv("DISCORD_TOKEN", "from-env")
    assert cfg.discord_token == "from-env"


def test_shorten_keeps_short_text_and_marks_a_cut_within_the_limit() -> None:
    from bot.render import shorten

    assert shorten("a red fox", 9) == "a red fox"
    assert shorten("a red fox in snow", 9) == "a red fo…"
    assert shorten("a red fox in snow", 7) == "a red…"  # no space left before the mark
    assert len(shorten("x" * 5000, 4096)) == 4096


def test_a_durable_write_leaves_only_the_whole_file(tmp_path, monkeypatch):
    import os

    from engine.durable import write_durably

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "a.png"
    write_durably(target, b"png bytes")
    assert target.read_bytes() == b"png bytes" and len(synced) == 2  # the file and its folder
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no partial file left

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    import pytest

    with pytest.raises(OSError):
        write_durably(tmp_path / "b.png", b"other")
    assert not (tmp_path / "b.png").exists()  # never a half-written file under the final name
