"""bench/dit_flops.py: the DiT's arithmetic per step, on which issue 12's --n 4 floor rests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.dit_flops import block_weights, main, measured_steps, step_flops


def test_the_blocks_hold_flux_twelve_billion_weights_split_by_the_tokens_they_see() -> None:
    seen = block_weights()
    assert seen["image"] == seen["text"]  # a double block's two sides are the same shape
    assert 11.5e9 < sum(seen.values()) < 12.0e9  # FLUX.1's "12B", less embedders and the head


def test_a_step_counts_each_weight_on_its_own_tokens_and_scales_with_the_images() -> None:
    w = block_weights()
    one = step_flops(1024)
    # 4096 image tokens + 512 text tokens: double-block sides see their own, singles see all
    assert one["linear"] == 2 * (w["image"] * 4096 + w["text"] * 512 + w["all"] * 4608)
    assert one["attention"] == 57 * 4 * 4608**2 * 3072
    four = step_flops(1024, images=4)
    assert four["total"] == 4 * one["total"]
    assert step_flops(512)["total"] < one["total"] / 3  # a quarter of the tokens, less attention


def test_the_table_names_the_floor_and_how_near_the_measured_step_came(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "actions.json"
    run.write_text(json.dumps({"rows": [
        {"jobs": {"one 1024²": {"s_step": 0.14}, "--n 4 1024²": {"s_step": 0.53},
                  "vary strong (0.7)": {"s_step": 0.10}}},
        {"jobs": {"one 1024²": {"s_step": 0.131}, "--n 4 1024²": {"s_step": 0.504}}},
    ]}))
    assert measured_steps(run) == {1: 0.131, 4: 0.504}  # the fastest of each, vary left out
    assert main(["--measured", str(run)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    floor_one = step_flops(1024)["total"] / 989e12
    assert rows[0].startswith("| 1 × 1024² | 94.2") and f"| {floor_one:.3f} | 0.131 |" in rows[0]
    assert rows[1].startswith("| 4 × 1024² | 376.8") and f"{floor_one * 4 / 0.504:.0%}" in rows[1]
