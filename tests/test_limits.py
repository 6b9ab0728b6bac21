"""The memory limiter backend: GCRA per key, tpm debt, leases, and idle-state expiry."""

from __future__ import annotations

from gateway.limits import LimiterBackend
from gateway.limits.gcra import Rate, tokens_per_minute
from gateway.limits.memory import MemoryLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_limiter_implements_the_backend_interface() -> None:
    backend: LimiterBackend = MemoryLimiter()
    assert backend is not None


async def test_keys_are_limited_independently() -> None:
    lim = MemoryLimiter(clock=Clock())
    rate = Rate(60, burst=1)
    assert (await lim.hit("ip:a", rate)).allowed
    assert not (await lim.hit("ip:a", rate)).allowed
    assert (await lim.hit("ip:b", rate)).allowed


async def test_a_flood_of_distinct_keys_does_not_grow_memory_without_bound() -> None:
    clock = Clock()
    lim = MemoryLimiter(clock=clock, sweep_every=10.0)
    rate = Rate(1200)  # the per-IP default: tolerance about 6 s
    for i in range(50_000):
        await lim.hit(f"ip:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", rate)
        await lim.debt(f"tpm:bad-{i}", tokens_per_minute(100))  # a check stores nothing
    assert len(lim) == 50_000
    clock.now += rate.tolerance + 10.0
    await lim.hit("ip:one-more", rate)
    assert len(lim) == 1


async def test_sustained_traffic_from_new_keys_stays_bounded_by_the_active_ones() -> None:
    clock = Clock()
    lim = MemoryLimiter(clock=clock, sweep_every=1.0)
    rate = Rate(60, burst=1)  # each key idles out 1 s after its last hit
    peak = 0
    for i in range(20_000):  # 100 new keys per simulated second for 200 s
        clock.now += 0.01
        await lim.hit(f"k{i}", rate)
        peak = max(peak, len(lim))
    assert peak <= 250


async def test_slots_are_limited_and_released_idempotently() -> None:
    lim = MemoryLimiter(clock=Clock())
    a = await lim.slot_acquire("conc:c", 2, ttl=60)
    b = await lim.slot_acquire("conc:c", 2, ttl=60)
    assert a and b and a != b
    assert await lim.slot_acquire("conc:c", 2, ttl=60) is None
    await lim.slot_release("conc:c", a)
    await lim.slot_release("conc:c", a)  # twice: no effect on the other lease
    assert lim.held("conc:c") == 1
    assert await lim.slot_acquire("conc:c", 2, ttl=60) is not None
    assert await lim.slot_acquire("conc:c", 2, ttl=60) is None


async def test_a_lease_expires_after_its_ttl_and_empty_keys_are_forgotten() -> None:
    clock = Clock()
    lim = MemoryLimiter(clock=clock, sweep_every=5.0)
    assert await lim.slot_acquire("conc:c", 1, ttl=30) is not None
    clock.now += 31
    assert await lim.slot_acquire("conc:c", 1, ttl=30) is not None  # the stale one expired
    clock.now += 31
    await lim.hit("other", Rate(60))
    assert lim.held("conc:c") == 0
    assert len(lim) == 1


async def test_charged_tokens_refuse_until_they_have_refilled() -> None:
    clock = Clock()
    lim = MemoryLimiter(clock=clock)
    rate = tokens_per_minute(600)
    await lim.charge("tpm:c", rate, 900)
    d = await lim.debt("tpm:c", rate)
    assert not d.allowed and d.retry_after >= 29
    clock.now += d.retry_after + 0.01
    assert (await lim.debt("tpm:c", rate)).allowed
