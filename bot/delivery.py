"""Getting a result to the chat: retries with back-off while the bot runs, then giving up.

Platform-neutral: the adapter passes ``send``, a coroutine that posts the result and returns where
it went (e.g. ``"discord:channel/1/message/2"``), and ``is_permanent`` for errors not worth a retry
(the chat is gone, the bot was removed). The journal records the outcome either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from engine.config import DeliverySection
from engine.engine import Engine
from engine.job import Job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    first_delay_s: float = 2.0
    max_delay_s: float = 300.0
    give_up_after_s: float = 24 * 3600.0

    @classmethod
    def from_config(cls, section: DeliverySection) -> RetryPolicy:
        return cls(attempts=section.attempts, first_delay_s=section.first_delay_s,
                   max_delay_s=section.max_delay_s, give_up_after_s=section.give_up_after_s)

    def delay(self, attempt: int) -> float:
        # the exponent is capped: background retries reach attempt numbers a float overflows at
        return min(self.max_delay_s, self.first_delay_s * 2 ** min(attempt - 1, 40))


async def deliver(
    engine: Engine,
    job: Job,
    send: Callable[[], Awaitable[str]],
    *,
    policy: RetryPolicy = RetryPolicy(),
    is_permanent: Callable[[BaseException], bool] = lambda exc: False,
    on_delay: Callable[[], Awaitable[None]] | None = None,
    is_unknown: Callable[[BaseException], bool] = lambda exc: False,
) -> bool:
    """Post a result; journal each attempt. ``policy.attempts`` quick tries on a doubling
    back-off, then (``on_delay`` tells the user once) a try every ``max_delay_s`` for as long
    as the bot runs, until ``give_up_after_s`` after the job was accepted: then the journal
    gives it up. An error ``is_permanent`` says is hopeless ends the tries at once (the result
    stays undelivered: a restart tries again until it is that old). A restart picks undelivered
    results up again from the journal.

    An error ``is_unknown`` says may have come after the platform took the post (a timeout
    once the upload was sent) ends the tries too, journalled as delivered: posting again could
    show the image twice, so such a result is delivered at most once."""
    last_error = ""
    attempt = 0
    out_of_time = False
    while True:
        attempt += 1
        try:
            where = await send()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # network, 5xx, 429 after the library's own retries
            last_error = f"{type(exc).__name__}: {exc}"
            if is_unknown(exc):
                log.warning("delivering job %s timed out after the upload was sent (%s); not "
                            "sending it again (at most once)", job.id, last_error)
                await engine.mark_delivered(job, f"unknown: {last_error}"[:200])
                return True
            log.warning("delivering job %s failed (attempt %d): %s", job.id, attempt, last_error)
            await engine.mark_undelivered(job, last_error)
            if is_permanent(exc):
                break
            if attempt == policy.attempts and on_delay is not None:
                await _quietly(on_delay, job)
            wait = policy.delay(attempt)
            if engine.clock() - job.created_at + wait > policy.give_up_after_s:
                out_of_time = True
                break
            await asyncio.sleep(wait)
            continue
        await engine.mark_delivered(job, where)
        return True
    if out_of_time or engine.clock() - job.created_at > policy.give_up_after_s:
        await engine.give_up_delivery(job, last_error)  # no restart offers it again
    return False


async def _quietly(callback: Callable[[], Awaitable[None]], job: Job) -> None:
    try:
        await callback()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # telling the user is best effort while the platform fails
        log.warning("could not tell the user of job %s about the delay: %s", job.id, exc)
