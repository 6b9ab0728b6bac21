"""The Redis limiter against a real redis-server: shared GCRA, tpm, concurrency leases,
and the failure policy when Redis is gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import structlog

from gateway.limits.gcra import Rate, tokens_per_minute
from gateway.limits.memory import MemoryLimiter
from gateway.limits.redis import RedisLimiter
from gateway.redisconn import RedisConnection, RedisUnavailable

from .redis_server import RedisServer

MakeLimiter = Callable[..., Awaitable[RedisLimiter]]


@pytest.fixture
async def make_limiter(redis_url: str) -> AsyncIterator[MakeLimiter]:
    """Limiters on their own connections, as separate gateway instances would have."""
    made: list[tuple[RedisConnection, RedisLimiter]] = []

    async def go(
        *, fail_open: bool = True, lease_ttl: float = 5.0, url: str = redis_url
    ) -> RedisLimiter:
        conn = RedisConnection(url, interval=0.1)
        await conn.start()
        limiter = RedisLimiter(conn, fail_open=fail_open, lease_ttl=lease_ttl)
        made.append((conn, limiter))
        return limiter

    yield go
    for conn, limiter in made:
        await limiter.aclose()
        await conn.close()


async def test_rpm_is_shared_by_two_instances(make_limiter: MakeLimiter) -> None:
    a, b = await make_limiter(), await make_limiter()
    rate = Rate(limit=60, burst=4)  # 4 at once, then one a second
    decisions = [await (a if i % 2 else b).hit("rpm:alice", rate) for i in range(4)]
    assert [d.allowed for d in decisions] == [True] * 4
    assert [d.remaining for d in decisions] == [3, 2, 1, 0]
    refused = await a.hit("rpm:alice", rate)
    assert not refused.allowed
    assert 0 < refused.retry_after <= 1.0
    assert (await b.hit("rpm:bob", rate)).allowed  # another key, another budget


async def test_gcra_decisions_match_the_memory_backend(make_limiter: MakeLimiter) -> None:
    """Same history, same answers: Redis runs the same formula on the same doubles."""
    redis_lim = await make_limiter()
    memory = MemoryLimiter(clock=lambda: 1000.0)  # a frozen clock: no refill in between
    rate = Rate(limit=600, burst=3)
    for cost in (1, 1, 2, 1, 1):
        r, m = await redis_lim.hit("k", rate, cost), await memory.hit("k", rate, cost)
        assert r.allowed == m.allowed
        assert r.remaining == m.remaining
        assert r.limit == m.limit
        # Redis' clock moves between calls; the memory one does not.
        assert r.retry_after == pytest.approx(m.retry_after, abs=0.05)


async def test_tpm_charged_after_the_fact_refuses_on_every_instance(
    make_limiter: MakeLimiter,
) -> None:
    a, b = await make_limiter(), await make_limiter()
    rate = tokens_per_minute(1000)
    assert (await b.debt("tpm:alice", rate)).allowed
    await a.charge("tpm:alice", rate, 1500)  # one big answer: over the minute's budget
    refused = await b.debt("tpm:alice", rate)
    assert not refused.allowed
    assert refused.retry_after >= 29  # 500 tokens over at 1000/min
    assert refused.retry_after <= 31


async def test_concurrency_slots_are_shared_and_released(make_limiter: MakeLimiter) -> None:
    a, b = await make_limiter(), await make_limiter()
    l1 = await a.slot_acquire("conc:alice", 2, ttl=60)
    l2 = await b.slot_acquire("conc:alice", 2, ttl=60)
    assert l1 and l2 and l1 != l2
    assert await a.slot_acquire("conc:alice", 2, ttl=60) is None
    await b.slot_release("conc:alice", l2)
    await b.slot_release("conc:alice", l2)  # twice: a no-op
    assert await a.slot_acquire("conc:alice", 2, ttl=60) is not None


async def test_held_slots_are_renewed_past_the_lease(make_limiter: MakeLimiter) -> None:
    a, b = await make_limiter(lease_ttl=0.6), await make_limiter(lease_ttl=0.6)
    assert await a.slot_acquire("conc:alice", 1, ttl=60)
    await asyncio.sleep(1.5)  # 2.5 leases: only renewal keeps it
    assert await b.slot_acquire("conc:alice", 1, ttl=60) is None


async def test_a_dead_holders_slots_come_back_after_the_lease(make_limiter: MakeLimiter) -> None:
    a, b = await make_limiter(lease_ttl=0.5), await make_limiter(lease_ttl=0.5)
    assert await a.slot_acquire("conc:alice", 1, ttl=60)
    # The holder "dies": it stops renewing and never releases.
    assert a._renewer is not None
    a._renewer.cancel()
    a._held.clear()
    assert await b.slot_acquire("conc:alice", 1, ttl=60) is None
    start = time.monotonic()
    while await b.slot_acquire("conc:alice", 1, ttl=60) is None:
        assert time.monotonic() - start < 3, "the dead holder's slot never came back"
        await asyncio.sleep(0.05)
    assert time.monotonic() - start <= 0.5 + 0.3


async def test_idle_state_expires_in_redis(make_limiter: MakeLimiter, redis_url: str) -> None:
    lim = await make_limiter()
    await lim.hit("ip:203.0.113.9", Rate(limit=6000, burst=1))
    await lim.charge("tpm:x", tokens_per_minute(60000), 10)
    await lim.slot_acquire("conc:x", 1, ttl=60)
    for key in ("gw:lim:ip:203.0.113.9", "gw:lim:tpm:x", "gw:lim:conc:x"):
        ttl = await lim._conn.cmd.pttl(key)
        assert 0 < ttl <= 5000, key


async def test_redis_down_fails_open_by_default(
    make_limiter: MakeLimiter, redis_server: RedisServer
) -> None:
    lim = await make_limiter()
    redis_server.stop()
    rate = Rate(limit=1, burst=1)
    for _ in range(3):
        assert (await lim.hit("rpm:alice", rate)).allowed
    assert (await lim.debt("tpm:alice", rate)).allowed
    await lim.charge("tpm:alice", rate, 10)  # never raises
    lease = await lim.slot_acquire("conc:alice", 1, ttl=60)
    assert lease is not None
    await lim.slot_release("conc:alice", lease)
    assert lim._conn.readiness() == "redis unreachable"


async def test_redis_down_fails_closed_when_configured(
    make_limiter: MakeLimiter, redis_server: RedisServer
) -> None:
    lim = await make_limiter(fail_open=False)
    redis_server.stop()
    with pytest.raises(RedisUnavailable) as exc:
        await lim.hit("rpm:alice", Rate(limit=60))
    assert exc.value.status == 503
    with pytest.raises(RedisUnavailable):
        await lim.slot_acquire("conc:alice", 1, ttl=60)
    await lim.charge("tpm:alice", Rate(limit=60), 5)  # after the fact: nothing to refuse


async def test_limiter_recovers_after_a_redis_restart(
    make_limiter: MakeLimiter, redis_server: RedisServer
) -> None:
    a, b = await make_limiter(lease_ttl=0.6), await make_limiter(lease_ttl=0.6)
    assert await a.slot_acquire("conc:alice", 1, ttl=60)
    redis_server.restart()  # every key is gone
    rate = Rate(limit=60, burst=1)
    assert (await a.hit("rpm:alice", rate)).allowed  # reconnected on its own
    assert not (await b.hit("rpm:alice", rate)).allowed  # and shared again
    await asyncio.sleep(0.5)  # one renewal: the held slot is counted again
    assert await b.slot_acquire("conc:alice", 1, ttl=60) is None
    assert a._conn.up and b._conn.up


async def test_while_redis_is_known_down_checks_skip_it_and_log_nothing_per_call(
    make_limiter: MakeLimiter, redis_server: RedisServer
) -> None:
    lim = await make_limiter()
    redis_server.stop()
    await lim.hit("rpm:alice", Rate(limit=60))  # the failure that wakes the monitor
    start = time.monotonic()
    while lim._conn.up:
        assert time.monotonic() - start < 5
        await asyncio.sleep(0.01)
    with structlog.testing.capture_logs() as logs:
        for _ in range(200):
            assert (await lim.hit("rpm:alice", Rate(limit=60))).allowed
            assert await lim.slot_acquire("conc:alice", 1, ttl=60) is not None
    assert logs == []


async def test_a_lease_released_while_its_renewal_is_in_flight_stays_released(
    make_limiter: MakeLimiter,
) -> None:
    a, b = await make_limiter(lease_ttl=5.0), await make_limiter(lease_ttl=5.0)
    lease = await a.slot_acquire("conc:alice", 1, ttl=60)
    assert lease is not None
    real = a._renew

    async def renew_after_release(*, keys: list[str], args: list[object]) -> object:
        # The renewal has taken its list of held leases; the release reaches Redis first.
        await a.slot_release("conc:alice", lease)
        return await real(keys=keys, args=args)

    a._renew = renew_after_release  # type: ignore[assignment]
    await a.renew()
    # The released slot is free, not held again by a ghost lease for lease_ttl.
    assert await b.slot_acquire("conc:alice", 1, ttl=60) is not None


@pytest.mark.parametrize(
    "key", ["conc:alice", "conc:a{b}c", "conc:a{}b", "conc:{x", "conc:x}y{", "ip:::1"]
)
def test_a_lease_marker_shares_its_zsets_cluster_slot(key: str) -> None:
    """Cluster: the lease zset and this instance's marker beside it go in one script call."""
    from redis.crc import key_slot

    from gateway.limits.redis import PREFIX, hash_tag, slots_key

    zset = slots_key(key)
    marker = f"{PREFIX}i:{{{hash_tag(zset)}}}:0123456789abcdef"
    assert key_slot(marker.encode()) == key_slot(zset.encode())


async def test_a_redis_refusing_every_command_is_logged_once_not_per_request(
    make_limiter: MakeLimiter, redis_server: RedisServer
) -> None:
    """Not unreachable, refusing (OOM, READONLY, a script error): each request meets the
    same error; one log line says so, not one per request (journald keeps every line)."""
    from structlog.testing import capture_logs

    from .redis_server import _command

    limiter = await make_limiter()  # fail open: every check admits
    _command(redis_server.port, "CONFIG", "SET", "maxmemory", "1")  # writes now refused: OOM
    try:
        with capture_logs() as logs:
            for _ in range(50):
                assert (await limiter.hit("rpm:flood", Rate(limit=600, burst=5))).allowed
    finally:
        _command(redis_server.port, "CONFIG", "SET", "maxmemory", "0")
    errors = [e for e in logs if e["event"] == "redis_error"]
    assert len(errors) == 1, errors[:3]
    assert errors[0]["op"] == "hit" and "maxmemory" in errors[0]["error"]
