"""Per-user rolling-window rate limit, driven by a fake clock over a real journal."""

from __future__ import annotations

import pytest

from engine import quota_text
from engine.config import AccessSection, RateLimitSection
from engine.errors import RateLimited
from engine.rate_limit import Quota, RateLimiter
from engine.request import ImageRequest, Origin, User
from engine.store import Store
from tests.conftest import FakeClock

ALICE = User("discord", "42", "Alice")
HOUR = 3600.0


def limiter(store: Store, clock: FakeClock, per_window: int = 3, window_s: float = HOUR,
            admins: list[str] | None = None) -> RateLimiter:
    return RateLimiter(store, RateLimitSection(images_per_window=per_window, window_s=window_s),
                       AccessSection(discord_admins=admins or []), clock=clock)


async def submit(store: Store, clock: FakeClock, user: User = ALICE, job_id: str = "") -> str:
    """What the engine does for an accepted request: journal it at the clock's time."""
    job_id = job_id or f"job-{clock.now}-{user.key}"
    request = ImageRequest("a fox", seed=1, steps=20, width=1024, height=1024, guidance=3.5)
    await store.add_job(job_id, user, Origin(user.platform), request, clock.now)
    return job_id


async def fill(store: Store, clock: FakeClock, count: int, step: float = 100.0,
               user: User = ALICE) -> list[str]:
    ids = []
    for _ in range(count):
        ids.append(await submit(store, clock, user))
        clock.now += step
    return ids


async def test_limit_reached_then_window_rolls(store: Store, clock: FakeClock):
    limits = limiter(store, clock)
    first = clock.now
    await fill(store, clock, 2)
    assert await limits.quota(ALICE) == Quota(limit=3, used=2, remaining=1,
                                              resets_at=first + HOUR)
    await limits.check(ALICE)  # one left
    await fill(store, clock, 1)  # the jobs were made at first, first+100, first+200

    assert await limits.quota(ALICE) == Quota(limit=3, used=3, remaining=0,
                                              resets_at=first + HOUR)
    with pytest.raises(RateLimited) as caught:
        await limits.check(ALICE)
    assert caught.value.retry_at == first + HOUR
    waited = first + HOUR - clock.now  # 3300 s
    assert str(caught.value) == (
        f"You have used your 3 images for this hour; you can ask again in "
        f"{round(waited / 60)} minutes.")

    clock.now = first + HOUR - 0.5
    with pytest.raises(RateLimited, match="in 1 second"):
        await limits.check(ALICE)

    clock.now = first + HOUR  # the oldest job has left the window, exactly at retry_at
    await limits.check(ALICE)
    quota = await limits.quota(ALICE)
    assert (quota.used, quota.remaining, quota.resets_at) == (2, 1, first + 100 + HOUR)


async def test_a_job_of_n_images_counts_n_and_a_too_big_n_says_what_fits(
        store: Store, clock: FakeClock):
    """Issue 12: --n 4 is four images of the limit, in one journal row."""
    limits = limiter(store, clock, per_window=5)
    first = clock.now
    request = ImageRequest("a fox", seed=1, steps=20, width=1024, height=1024, guidance=3.5,
                           count=4)
    await limits.check(ALICE, 4)
    await store.add_job("grid", ALICE, Origin("discord"), request, clock.now)
    clock.now += 100
    assert (await limits.quota(ALICE)).used == 4
    with pytest.raises(RateLimited) as caught:
        await limits.check(ALICE, 2)
    # one left; two more once the grid's four have left the window
    assert str(caught.value).startswith("You have 1 image left for this hour and this asks "
                                        "for 2; try --n 1, or ask again in 59 minutes")
    assert caught.value.retry_at == first + HOUR
    await limits.check(ALICE, 1)
    with pytest.raises(RateLimited, match="at most --n 5"):
        await limits.check(ALICE, 6)
    await store.refund("grid")  # refunded (the bot's fault): all four come back
    assert (await limits.quota(ALICE)).used == 0


async def test_refund_frees_a_slot(store: Store, clock: FakeClock):
    limits = limiter(store, clock)
    ids = await fill(store, clock, 3)
    with pytest.raises(RateLimited):
        await limits.check(ALICE)
    await store.set_status(ids[1], "running", at=clock.now)
    await store.set_status(ids[1], "failed", at=clock.now, error="the GPU fell over")
    await store.refund(ids[1])
    await limits.check(ALICE)
    assert (await limits.quota(ALICE)).remaining == 1


async def test_cancel_before_start_frees_a_slot_but_not_after(store: Store, clock: FakeClock):
    limits = limiter(store, clock)
    ids = await fill(store, clock, 3)
    await store.set_status(ids[0], "running", at=clock.now)
    await store.set_status(ids[0], "cancelled", at=clock.now)
    with pytest.raises(RateLimited):
        await limits.check(ALICE)
    await store.set_status(ids[2], "cancelled", at=clock.now)  # never started
    await limits.check(ALICE)


async def test_admin_is_exempt_on_their_platform_only(store: Store, clock: FakeClock):
    limits = limiter(store, clock, per_window=1, admins=[ALICE.user_id])
    await fill(store, clock, 4)
    assert await limits.quota(ALICE) == Quota(limit=None, used=4, remaining=None, resets_at=None)
    await limits.check(ALICE)

    telegram_twin = User("telegram", ALICE.user_id, "Not an admin")
    await fill(store, clock, 1, user=telegram_twin)
    with pytest.raises(RateLimited, match="your 1 image for"):
        await limits.check(telegram_twin)


async def test_same_user_id_on_two_platforms_has_two_quotas(store: Store, clock: FakeClock):
    limits = limiter(store, clock, per_window=2)
    twin = User("telegram", ALICE.user_id, "Twin")
    await fill(store, clock, 2, user=ALICE)
    with pytest.raises(RateLimited):
        await limits.check(ALICE)
    assert await limits.quota(twin) == Quota(limit=2, used=0, remaining=2, resets_at=None)
    await limits.check(twin)


async def test_override_replaces_the_config_limit(store: Store, clock: FakeClock):
    limits = limiter(store, clock, per_window=3)
    await fill(store, clock, 1)
    await store.set_limit_override(ALICE, 1)
    with pytest.raises(RateLimited):
        await limits.check(ALICE)
    await store.set_limit_override(ALICE, 5)
    assert (await limits.quota(ALICE)).remaining == 4
    await store.set_limit_override(ALICE, 0)  # an admin's 0: no images at all
    assert (await limits.quota(ALICE)).limit == 0
    with pytest.raises(RateLimited, match="limit to 0"):
        await limits.check(ALICE)
    twin = User("telegram", ALICE.user_id)
    await store.set_limit_override(twin, 0)  # also with nothing used in the window
    with pytest.raises(RateLimited, match="limit to 0"):
        await limits.check(twin)
    await store.set_limit_override(ALICE, None)
    assert (await limits.quota(ALICE)).limit == 3


async def test_lowered_override_waits_for_enough_jobs_to_leave(store: Store, clock: FakeClock):
    limits = limiter(store, clock, per_window=5)
    first = clock.now
    await fill(store, clock, 3)  # at first, first+100, first+200
    await store.set_limit_override(ALICE, 1)
    quota = await limits.quota(ALICE)
    assert (quota.used, quota.remaining, quota.resets_at) == (3, 0, first + 200 + HOUR)
    clock.now = first + 100 + HOUR  # two have left; one still in the window fills the 1 slot
    with pytest.raises(RateLimited):
        await limits.check(ALICE)
    clock.now = first + 200 + HOUR
    await limits.check(ALICE)


async def test_zero_in_config_means_unlimited(store: Store, clock: FakeClock):
    limits = limiter(store, clock, per_window=0)
    await fill(store, clock, 20, step=1.0)
    await limits.check(ALICE)
    assert await limits.quota(ALICE) == Quota(limit=None, used=20, remaining=None, resets_at=None)


async def test_short_window_in_seconds(store: Store, clock: FakeClock):
    limits = limiter(store, clock, per_window=2, window_s=45.0)
    await fill(store, clock, 2, step=1.0)  # at t, t+1; now t+2
    with pytest.raises(RateLimited) as caught:
        await limits.check(ALICE)
    assert str(caught.value) == ("You have used your 2 images for the last 45 seconds; "
                                 "you can ask again in 43 seconds.")


@pytest.mark.parametrize(("seconds", "words"), [
    (0.2, "1 second"), (1, "1 second"), (40, "40 seconds"), (59.5, "1 minute"),
    (61, "2 minutes"), (720, "12 minutes"), (720.0000001, "12 minutes"), (3599, "1 hour"),
    (3600, "1 hour"), (3601, "1 hour and 1 minute"), (5400, "1 hour and 30 minutes"),
    (7200, "2 hours"), (90000, "25 hours"),
])
def test_describe_wait_rounds_up(seconds: float, words: str):
    assert str(quota_text.wait(seconds)) == words


@pytest.mark.parametrize(("seconds", "words"), [
    (3600, "this hour"), (21600, "the last 6 hours"), (5400, "the last 90 minutes"),
    (60, "this minute"), (86400, "this day"), (172800, "the last 2 days"),
    (45, "the last 45 seconds"), (1, "this second"),
])
def test_describe_window(seconds: float, words: str):
    assert str(quota_text.window(seconds)) == words


def test_refusal_message_reads_like_the_example():
    said = quota_text.used_up(quota_text.YOU, 10, quota_text.window(3600.0), 12 * 60 - 5,
                              priced=False)
    assert str(said) == (
        "You have used your 10 images for this hour; you can ask again in 12 minutes.")
