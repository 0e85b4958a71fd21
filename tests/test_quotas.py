"""Issue 13: quotas by GPU time (``mode = "gpu_seconds"``), per-chat caps and a daily cap, over a
real journal and a fake clock; the cost model and its calibration."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.caps import group_key
from engine.config import AccessSection, LimitsSection, RateLimitSection
from engine.costs import CostModel, StepCost, fit
from engine.errors import RateLimited
from engine.rate_limit import RateLimiter
from engine.request import ImageRequest, Origin, User
from engine.store import UNLIMITED, Store
from tests.conftest import FakeClock

ALICE = User("discord", "42", "Alice")
BOB = User("discord", "43", "Bob")
ADMIN = User("discord", "7", "Admin")
GUILD = Origin("discord", chat_id="100", extra={"guild_id": "900"})
OTHER_GUILD = Origin("discord", chat_id="200", extra={"guild_id": "901"})
DM = Origin("discord", chat_id="300", extra={"guild_id": ""})
HOUR = 3600.0
LIMITS = LimitsSection()


def request(steps: int = 20, side: int = 1024, count: int = 1, **more: object) -> ImageRequest:
    return ImageRequest("a fox", seed=1, steps=steps, width=side, height=side, guidance=3.5,
                        count=count, **more)  # type: ignore[arg-type]


def limiter(store: Store, clock: FakeClock, *, mode: str = "gpu_seconds", per_window: int = 10,
            per_chat: int = 0, per_day: int = 0) -> RateLimiter:
    config = RateLimitSection(images_per_window=per_window, window_s=HOUR, mode=mode,
                              per_chat_images_per_window=per_chat, images_per_day=per_day)
    return RateLimiter(store, config, AccessSection(discord_admins=[ADMIN.user_id]), clock,
                       LIMITS)


async def ask(limits: RateLimiter, store: Store, user: User, req: ImageRequest,
              origin: Origin = GUILD) -> str:
    """What the engine's submit does: admit (or raise), then journal with the charge."""
    charge = await limits.admit(user, req, origin)
    job_id = f"job{len(await store.jobs_for_user(user, 1000))}-{user.user_id}"
    await store.add_job(job_id, user, origin, req, limits.clock(), cost=charge.cost,
                        group_key=charge.group)
    return job_id


# -- the price of a request ------------------------------------------------------------------------
def test_a_request_costs_steps_times_pixels_times_images_in_default_images():
    costs = CostModel(LIMITS)
    assert costs.cost(request()) == pytest.approx(1.0)
    assert costs.cost(request(steps=50)) == pytest.approx(2.5)
    assert costs.cost(request(steps=4, side=512)) == pytest.approx(0.05)
    assert costs.cost(request(count=4)) == pytest.approx(4.0)
    # a variation at 0.35 runs ceil(20 × 0.35) = 7 steps
    assert costs.cost(request(init_image="x.png", strength=0.35)) == pytest.approx(7 / 20)


def test_measured_step_times_calibrate_the_price_of_other_sizes():
    costs = CostModel(LIMITS)
    costs.observe(1024 * 1024, 0.20)
    assert costs.calibration is None  # one size: proportional still
    assert costs.cost(request(side=512)) == pytest.approx(0.25)
    costs.observe(512 * 512, 0.08)  # a small image is relatively dearer: a fixed part per step
    assert costs.calibration == StepCost(pytest.approx(0.04), pytest.approx(0.12 / 786_432))
    assert costs.cost(request(side=512)) == pytest.approx(0.08 / 0.20)
    assert costs.cost(request()) == pytest.approx(1.0)  # the default stays 1.0 by definition


def test_a_step_time_that_does_not_grow_with_the_size_is_not_a_calibration():
    """The dry-run backend sleeps the same for every size: pricing stays proportional."""
    assert fit([(262_144, 0.05), (1_048_576, 0.05)]) is None
    assert fit([(1_000_000, 0.2), (1_100_000, 0.25)]) is None  # too close to tell apart
    through_origin = fit([(262_144, 0.01), (1_048_576, 0.2)])  # negative fixed part: noise
    assert through_origin is not None and through_origin.fixed == 0.0


async def test_the_calibration_is_read_back_from_the_journal_after_a_restart(tmp_path: Path):
    path = tmp_path / "bot.sqlite3"
    async with Store(path) as store:
        for n, (side, step_s) in enumerate([(1024, 0.2), (512, 0.08), (768, 0.13)]):
            await store.add_job(f"j{n}", ALICE, GUILD, request(side=side), 1.0 + n)
            await store.record_timing(f"j{n}", gpu_s=step_s * 20, step_s=step_s)
    async with Store(path) as store:
        measured = await store.recent_step_times()
        assert measured == [(1024 * 1024, 0.2), (512 * 512, 0.08), (768 * 768, 0.13)]
        costs = CostModel(LIMITS)
        costs.seed(measured)
        assert costs.calibration is not None
        assert costs.cost(request(side=512)) == pytest.approx(0.4, abs=0.02)


# -- gpu_seconds mode ------------------------------------------------------------------------------
async def test_gpu_seconds_charges_the_cost_and_says_what_fits(store: Store, clock: FakeClock):
    limits = limiter(store, clock, per_window=3)
    await ask(limits, store, ALICE, request(steps=50))  # 2.5
    await ask(limits, store, ALICE, request(steps=4, side=512))  # 0.05: cheap, still fits
    quota = await limits.quota(ALICE)
    assert quota.priced and quota.used == pytest.approx(2.55)
    assert quota.remaining == pytest.approx(0.45)
    with pytest.raises(RateLimited) as caught:
        await ask(limits, store, ALICE, request())  # 1.0 > 0.45
    assert str(caught.value) == (
        "This asks for 1 image's worth; you have 0.45 left for this hour. Ask for fewer steps, "
        "a smaller size or a smaller --n, or ask again in 1 hour.")
    assert caught.value.retry_at == clock.now + HOUR  # the 2.5 job leaving makes room
    await ask(limits, store, ALICE, request(steps=8))  # 0.4 fits
    assert len(await store.jobs_for_user(ALICE)) == 3


async def test_gpu_seconds_refusals_for_too_big_and_used_up(store: Store, clock: FakeClock):
    limits = limiter(store, clock, per_window=2)
    with pytest.raises(RateLimited) as caught:
        await ask(limits, store, ALICE, request(steps=50))  # 2.5 > 2
    assert str(caught.value) == (
        "This asks for 2.5 images' worth, more than your limit of 2 for this hour; please ask "
        "for fewer steps, a smaller size or a smaller --n.")
    await ask(limits, store, ALICE, request(steps=40))  # exactly 2.0
    clock.now += 600
    with pytest.raises(RateLimited) as caught:
        await ask(limits, store, ALICE, request(steps=4, side=512))
    assert str(caught.value) == ("You have used your 2 images' worth for this hour; this asks "
                                 "for 0.05, which fits again in 50 minutes.")


async def test_the_charge_is_read_back_after_a_restart_and_a_refund_frees_it(
        tmp_path: Path, clock: FakeClock):
    path = tmp_path / "bot.sqlite3"
    async with Store(path) as store:
        big = await ask(limiter(store, clock), store, ALICE, request(steps=50, count=2))  # 5.0
    # a restart, and the calibration changed meanwhile: the job keeps the price it was charged
    async with Store(path) as store:
        limits = limiter(store, clock)
        limits.costs.seed([(262_144, 0.1), (1_048_576, 0.2)])
        assert (await limits.quota(ALICE)).used == pytest.approx(5.0)
        await store.set_status(big, "running", at=clock.now)
        await store.set_status(big, "failed", at=clock.now, error="out of memory")
        await store.refund(big)  # the bot's fault (engine/lifecycle.py): it costs nothing
        assert (await limits.quota(ALICE)).used == 0


async def test_a_job_from_before_v8_is_priced_as_its_images(store: Store, clock: FakeClock):
    await store.add_job("old", ALICE, GUILD, request(count=3), clock.now)  # no cost column
    assert (await limiter(store, clock).quota(ALICE)).used == pytest.approx(3.0)


async def test_images_mode_is_unchanged_and_ignores_the_cost(store: Store, clock: FakeClock):
    limits = limiter(store, clock, mode="images", per_window=2)
    await ask(limits, store, ALICE, request(steps=50))  # one image, whatever its steps
    quota = await limits.quota(ALICE)
    assert (quota.used, quota.remaining, quota.priced) == (1, 1, False)
    await ask(limits, store, ALICE, request(steps=4, side=512))
    with pytest.raises(RateLimited, match="You have used your 2 images for this hour"):
        await ask(limits, store, ALICE, request(steps=1, side=256))


# -- per-chat caps ---------------------------------------------------------------------------------
def test_the_chat_a_job_counts_against():
    assert group_key(GUILD) == "discord:900"
    assert group_key(DM) == ""
    assert group_key(Origin("telegram", chat_id="-100123")) == "telegram:-100123"
    assert group_key(Origin("telegram", chat_id="42")) == ""  # a private chat
    assert group_key(Origin("console")) == ""


async def test_a_server_cap_counts_every_user_in_it(store: Store, clock: FakeClock):
    limits = limiter(store, clock, mode="images", per_window=10, per_chat=3)
    await ask(limits, store, ALICE, request(count=2))
    await ask(limits, store, BOB, request())
    with pytest.raises(RateLimited) as caught:
        await ask(limits, store, BOB, request())
    assert str(caught.value) == ("This server has used its 3 images for this hour; you can ask "
                                 "again in 1 hour.")
    await ask(limits, store, BOB, request(), OTHER_GUILD)  # another server has its own
    await ask(limits, store, BOB, request(), DM)  # a direct message has no chat cap
    await ask(limits, store, ADMIN, request(count=4))  # admins are exempt
    tg = User("telegram", "5", "Tg")
    group = Origin("telegram", chat_id="-100")
    await ask(limits, store, tg, request(count=3), group)
    with pytest.raises(RateLimited, match="This group has used its 3 images"):
        await ask(limits, store, tg, request(), group)
    clock.now += HOUR  # the window rolls for the chat too
    await ask(limits, store, BOB, request())


async def test_a_server_cap_in_gpu_seconds_says_what_fits(store: Store, clock: FakeClock):
    limits = limiter(store, clock, per_window=10, per_chat=3)
    await ask(limits, store, ALICE, request(count=2))
    clock.now += 60
    with pytest.raises(RateLimited) as caught:
        await ask(limits, store, BOB, request(steps=50))
    assert str(caught.value) == (
        "This asks for 2.5 images' worth; this server has 1 left for this hour. Ask for fewer "
        "steps, a smaller size or a smaller --n, or ask again in 59 minutes.")
    lost = await ask(limits, store, BOB, request())  # 1.0 fits
    await store.set_status(lost, "cancelled", at=clock.now)  # cancelled before it ran: refunded
    await ask(limits, store, BOB, request())


# -- the daily cap ---------------------------------------------------------------------------------
async def test_a_daily_cap_over_the_last_24_hours(store: Store, clock: FakeClock):
    limits = limiter(store, clock, mode="images", per_window=2, per_day=3)
    start = clock.now
    await ask(limits, store, ALICE, request(count=2))
    clock.now += HOUR
    quota = await limits.quota(ALICE)
    assert quota.day is not None and (quota.day.used, quota.day.remaining) == (2, 1)
    with pytest.raises(RateLimited) as caught:
        await ask(limits, store, ALICE, request(count=2))
    assert str(caught.value) == ("You have 1 image left for the last 24 hours and this asks for "
                                 "2; try --n 1, or ask again in 23 hours.")
    await ask(limits, store, ALICE, request())
    clock.now += HOUR
    with pytest.raises(RateLimited) as caught:
        await ask(limits, store, ALICE, request())
    assert caught.value.retry_at == start + 86400
    assert "used your 3 images for the last 24 hours" in str(caught.value)
    await store.set_limit_override(ALICE, UNLIMITED)  # "unlimited" lifts the daily cap too
    await ask(limits, store, ALICE, request())
    await store.set_limit_override(ALICE, 5)  # a number replaces the window's limit only
    with pytest.raises(RateLimited, match="last 24 hours"):
        await ask(limits, store, ALICE, request())
    clock.now = start + 86400
    await ask(limits, store, ALICE, request())


# -- the rules as properties -----------------------------------------------------------------------
JOBS = st.lists(st.tuples(
    st.sampled_from([ALICE, BOB, ADMIN]),
    st.sampled_from([4, 20, 50]),  # steps
    st.sampled_from([512, 768, 1024]),  # side
    st.integers(1, 4),  # --n
    st.floats(0, 1200),  # seconds since the last request
    st.sampled_from(["ran", "refunded", "cancelled queued"]),
), max_size=25)


@settings(max_examples=25, deadline=None)
@given(jobs=JOBS)
def test_no_user_or_server_is_ever_charged_past_its_limit(tmp_path_factory, jobs):
    """Under gpu_seconds with a server cap: whatever the sequence, what is charged in any window
    stays within each non-admin's limit and the server's cap (admins' jobs aside), and refunded
    or never-run jobs count for nothing."""
    path = tmp_path_factory.mktemp("q") / "bot.sqlite3"
    asyncio.run(_charge_sequence(path, jobs))


async def _charge_sequence(path: Path, jobs: list) -> None:
    clock = FakeClock()
    async with Store(path) as store:
        limits = limiter(store, clock, per_window=6, per_chat=8)
        accepted: list[tuple[float, User, float]] = []  # (at, user, cost) of what is charged
        for n, (user, steps, side, count, wait, fate) in enumerate(jobs):
            clock.now += wait
            req = request(steps=steps, side=side, count=count)
            try:
                charge = await limits.admit(user, req, GUILD)
            except RateLimited:
                continue
            job_id = f"j{n}"
            await store.add_job(job_id, user, GUILD, req, clock.now, cost=charge.cost,
                                group_key=charge.group)
            if fate == "refunded":
                await store.refund(job_id)
            elif fate == "cancelled queued":
                await store.set_status(job_id, "cancelled", at=clock.now)
            else:
                accepted.append((clock.now, user, charge.cost))

            def in_window(who: set[User], now: float = clock.now) -> float:
                return sum(c for at, u, c in accepted if u in who and at > now - HOUR)

            for one in (ALICE, BOB):
                assert in_window({one}) <= 6 + 1e-9
                assert (await limits.quota(one)).used == pytest.approx(in_window({one}))
            assert in_window({ALICE, BOB}) <= 8 + 1e-9
