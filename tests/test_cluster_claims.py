"""The bot's ledger of which worker runs which job (engine/cluster/claims.py), without NATS:
best fit, room per capability, a job whose worker left placed first, a job adopted after a
restart; and the fair queue letting a job that fits go ahead of one that waits for its card."""

from __future__ import annotations

from engine.cluster.claims import Claims
from engine.cluster.messages import WorkerInfo
from engine.fair_queue import FairQueue
from tests.conftest import make_request

SMALL = WorkerInfo("small", "gpu", "m", max_pixels=1024 * 1024, max_count=1, styles=("anime",))
BIG = WorkerInfo("big", "gpu", "m", max_pixels=2048 * 2048, max_count=4)
ONE = make_request("one")
GRID = make_request("grid").with_changes(count=4)
HUGE = make_request("huge", width=2048, height=2048)


def ledger(*workers: WorkerInfo) -> Claims:
    claims = Claims()
    claims.update({w.name: w for w in workers})
    return claims


def test_a_small_job_takes_the_smallest_free_worker_and_a_big_one_waits_for_the_big() -> None:
    claims = ledger(BIG, SMALL)
    assert claims.claim("a", ONE) and claims.worker_of("a") == "small"
    assert claims.claim("b", ONE) and claims.worker_of("b") == "big"  # any worker may run it
    assert not claims.claim("c", GRID)  # the big card is busy: the grid waits
    claims.release("b")
    assert not claims.claim("d", HUGE.with_changes(style="anime"))  # no one card has both
    assert claims.claim("c", GRID) and claims.worker_of("c") == "big"


def test_a_job_whose_worker_left_gets_the_next_fitting_worker_before_new_jobs() -> None:
    claims = ledger(BIG, SMALL)
    assert claims.claim("grid", GRID) and claims.claim("one", ONE)
    claims.update({"small": SMALL})  # big's heartbeat expired mid-job
    assert claims.worker_of("grid") == "big" and claims.moves_of("grid") == 0  # waits
    big2 = WorkerInfo("big2", "gpu", "m", max_pixels=2048 * 2048, max_count=4)
    claims.update({"small": SMALL, "big2": big2})
    assert claims.worker_of("grid") == "big2" and claims.moves_of("grid") == 1
    assert not claims.claim("next", GRID)  # big2 went to the orphan first


def test_after_a_restart_a_job_still_running_on_a_worker_is_adopted_there() -> None:
    busy = WorkerInfo("big", "gpu", "m", max_pixels=2048 * 2048, max_count=4, running="old")
    claims = ledger(busy, SMALL)
    assert not claims.claim("new-grid", GRID)  # big runs a job this bot did not hand it
    assert claims.claim("old", GRID) and claims.worker_of("old") == "big"
    claims.release("old")  # its heartbeat naming it for a beat more does not hold the card
    assert claims.claim("new-grid", GRID)


def test_pop_first_lets_a_job_that_fits_go_ahead_and_keeps_the_waiting_ones_turn() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("alice", "alice-grid")
    queue.push("bob", "bob-one")
    queue.push("alice", "alice-one")
    assert queue.pop_first(lambda item: not item.endswith("grid")) == "bob-one"
    assert list(queue.ordered()) == ["alice-grid", "alice-one"]  # alice's turn is still first
    assert queue.pop_first(lambda item: True) == "alice-grid"
