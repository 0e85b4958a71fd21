"""bench/dit_flops.py: the DiT's arithmetic per step, on which issue 12's --n 4 floor rests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.dit_flops import main, measured_steps, step_flops, weights_by_tokens

D = 3072


def test_the_linears_hold_flux_twelve_billion_weights_split_by_the_tokens_they_multiply() -> None:
    seen = weights_by_tokens()
    assert 11.8e9 < sum(seen.values()) < 12.0e9  # FLUX.1's "12B"
    # the modulations read the pooled vector only: 6 rows of D per double-block side, 3 per
    # single block, 2 for the last layer, and the timestep, guidance and CLIP embedders
    embedders = 2 * (256 * D + D * D) + 768 * D + D * D
    assert seen["vector"] == 19 * 2 * 6 * D * D + 38 * 3 * D * D + 2 * D * D + embedders
    # a single block's own linears (qkv + MLP in, attention + MLP out) see every token
    assert seen["all"] == 38 * (7 * D * D + 5 * D * D)


def test_a_step_counts_each_weight_on_its_own_tokens_and_scales_with_the_images() -> None:
    w = weights_by_tokens()
    one = step_flops(1024)
    # 4096 image tokens + 512 text tokens; the modulations run once per image
    assert one["linear"] == 2 * (w["image"] * 4096 + w["text"] * 512 + w["all"] * 4608
                                 + w["vector"])
    assert one["attention"] == 57 * 4 * 4608**2 * D
    # closed form: 12 D² of weights per double-block side and per single block on its tokens
    # (qkv 3, out 1, MLP 4 + 4; a single block fuses them), the rest under 0.1 TFLOP
    closed = 2 * 12 * D * D * (19 * 4096 + 19 * 512 + 38 * 4608)
    assert abs(one["linear"] - closed) < 0.1e12
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
    assert rows[0].startswith("| 1 × 1024² | 74.4") and f"| {floor_one:.3f} | 0.131 |" in rows[0]
    assert rows[1].startswith("| 4 × 1024² | 297.5") and f"{floor_one * 4 / 0.504:.0%}" in rows[1]
