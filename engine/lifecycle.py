"""A job's life, written down once. The engine and the journal (``store.py``) both enforce it.

    submit ─▶ queued ──start──▶ running ──image made──▶ finished ─┐
                │                  │ ──error──────────▶ failed ───┤  delivery (adapters):
                │ cancel           │ cancel                       │  delivered, or retried on a
                ▼                  ▼                              │  back-off until given up
             cancelled ◀───────────┘                              │  (``give_up_after_s``)
                                                                   ┘
    running ──shutdown past the grace, or a crash──▶ queued (runs again after the restart)

- The three end states (finished, failed, cancelled) are final: no move leaves them, so a job
  that ended never runs again, and a cancelled one is never delivered.
- A shutdown lets the running job finish within ``shutdown_grace_s``; a job still running then
  is put back to queued in the journal and runs again after the restart (as after a crash, where
  the journal still says running). A job the user cancelled is cancelled, shutdown or not.
- An illegal move is an error (``InvalidTransition``), never a silent write.

The charging rule: a job counts against its user's rate limit from the moment it is accepted
(so a queue cannot be filled past the limit) and keeps counting once it has started running,
also when it is cancelled while running (its GPU time was spent). It is refunded only when it
is cancelled while queued (also when a shutdown had put it back in line), or when it failed
through the bot's fault (out of memory after the retry, an internal error, a timeout the bot
caused).
"""

from __future__ import annotations

from engine.job import JobStatus

QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING
FINISHED, FAILED, CANCELLED = JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    QUEUED: frozenset({RUNNING, CANCELLED}),
    RUNNING: frozenset({FINISHED, FAILED, CANCELLED, QUEUED}),
    FINISHED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A move the table above does not allow: a bug in the caller, never a user's doing (so
    not an ``EngineError``, whose text users see)."""


def sources(target: JobStatus | str) -> tuple[str, ...]:
    """The statuses a job may move to ``target`` from (the journal's WHERE clause)."""
    goal = JobStatus(target)
    return tuple(s.value for s, targets in TRANSITIONS.items() if goal in targets)


def check(job_id: str, old: JobStatus | str, new: JobStatus | str) -> None:
    if JobStatus(new) not in TRANSITIONS[JobStatus(old)]:
        raise InvalidTransition(f"job {job_id} cannot go from {JobStatus(old).value} to "
                                f"{JobStatus(new).value}")


def refund_on_cancel(started: bool) -> bool:
    """Cancelled while queued: refunded; cancelled while running: stays charged."""
    return not started
