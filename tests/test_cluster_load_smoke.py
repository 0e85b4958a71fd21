"""The load test on a cluster, small (``bench/load_test.py --cluster``): the real bot process,
both fake platforms, a nats-server and two dry-run GPU worker processes, one SIGKILLed halfway.
Every accepted job is delivered once, none runs to its end twice, and the bot's shutdown leaves
no object in the images bucket. No timing assertions: throughput is reported, not tested."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("nats", reason="the cluster needs nats-py (the test extra)")

from bench.load_test import Scenario, comparison, run_load  # noqa: E402

SMALL = Scenario(users=10, commands=30, burst_size=10, burst_gap_s=1.0, images_per_window=3,
                 max_queue_per_user=3, max_queue_total=20, step_s=0.1, workers=2,
                 events=((0.5, "kill-worker"),), settle_timeout_s=120)


async def test_a_small_cluster_run_with_a_worker_killed_loses_and_repeats_nothing(
        tmp_path: Path) -> None:
    result = await run_load(SMALL, tmp_path)
    c, w = result.counts, result.cluster
    assert result.problems == []
    assert w is not None and w.workers == 2 and w.killed == ["w1"]
    assert c.outcomes["accepted"] >= 10 and c.outcomes["unanswered"] == 0
    assert c.jobs == c.completed == c.delivered_once == c.outcomes["accepted"]
    assert c.lost == 0 and c.delivered_twice == 0 and c.wrong_image == 0
    assert w.ran_twice == 0
    # a worker's log names each job it finished (the killed one may die before it logs)
    assert c.completed - 1 <= sum(w.runs.values()) <= c.completed
    assert w.runs["w2"] > 0
    assert w.objects_left == 0 and not w.bot_killed
    assert "| cluster | 2 |" in comparison([("cluster", result)])
