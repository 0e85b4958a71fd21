"""Getting a result to the chat: retries with backoff, then the undelivered path.

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
        return min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1))


async def deliver(
    engine: Engine,
    job: Job,
    send: Callable[[], Awaitable[str]],
    *,
    policy: RetryPolicy = RetryPolicy(),
    is_permanent: Callable[[BaseException], bool] = lambda exc: False,
) -> bool:
    """Try ``send`` up to ``policy.attempts`` times; journal delivered / undelivered."""
    last_error = ""
    for attempt in range(1, policy.attempts + 1):
        try:
            where = await send()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # network, 5xx, 429 after the library's own retries
            last_error = f"{type(exc).__name__}: {exc}"
            log.warning("delivering job %s failed (attempt %d/%d): %s", job.id, attempt,
                        policy.attempts, last_error)
            await engine.mark_undelivered(job, last_error)
            if is_permanent(exc) or attempt == policy.attempts:
                break
            await asyncio.sleep(policy.delay(attempt))
            continue
        await engine.mark_delivered(job, where)
        return True
    if engine.clock() - job.created_at > policy.give_up_after_s:
        await engine.give_up_delivery(job, last_error)
    return False
