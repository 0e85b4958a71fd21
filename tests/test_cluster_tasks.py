"""The cluster's background tasks stop for sure (engine/cluster/tasks.py), also one whose first
cancel is lost, as Python 3.11's ``wait_for`` inside nats-py can lose one."""

from __future__ import annotations

import asyncio

from engine.cluster import tasks
from engine.cluster.tasks import cancel_until_done


async def test_a_task_that_lost_its_first_cancel_is_stopped(monkeypatch) -> None:
    monkeypatch.setattr(tasks, "REPEAT_S", 0.05)
    lost = []

    async def reads_the_workers_for_ever() -> None:
        while True:
            try:
                await asyncio.sleep(0.01)  # a nats request
            except asyncio.CancelledError:
                if lost:
                    raise
                lost.append("cancel")  # what a swallowed cancel looks like from here

    task = asyncio.create_task(reads_the_workers_for_ever())
    await asyncio.sleep(0.02)
    task.cancel()  # a plain cancel and gather would wait for ever
    done, _ = await asyncio.wait([task], timeout=0.2)
    assert not done and lost == ["cancel"]
    await asyncio.wait_for(cancel_until_done([task]), 2)
    assert task.cancelled()


async def test_ended_and_failing_tasks_are_waited_for_without_raising() -> None:
    async def fails() -> None:
        raise RuntimeError("the server went away")

    ended = asyncio.create_task(asyncio.sleep(0))
    failing = asyncio.create_task(fails())
    await asyncio.sleep(0.01)
    await asyncio.wait_for(cancel_until_done([ended, failing]), 2)
    assert ended.done() and isinstance(failing.exception(), RuntimeError)
