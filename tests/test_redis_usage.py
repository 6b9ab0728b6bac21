"""Usage totals in Redis hashes: shared by instances, 503 when Redis is gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.redisconn import RedisConnection, RedisUnavailable
from gateway.usage.redis import RedisUsage
from gateway.usage.tap import Usage, UsageTotals

from .redis_server import RedisServer


@pytest.fixture
async def conns(redis_url: str) -> AsyncIterator[list[RedisConnection]]:
    made = [RedisConnection(redis_url, interval=0.1) for _ in range(2)]
    for c in made:
        await c.start()
    yield made
    for c in made:
        await c.close()


async def test_totals_add_up_across_instances(conns: list[RedisConnection]) -> None:
    a, b = RedisUsage(conns[0]), RedisUsage(conns[1])
    await a.record("alice", Usage(10, 5, 15), streamed=True)
    await b.record("alice", Usage(1, 2, 3), streamed=False)
    await b.record("alice", None, streamed=True)  # a request without usage still counts
    await a.record("bob", Usage(7, 0, 7), streamed=False)
    assert await b.totals("alice") == UsageTotals(3, 11, 7, 18)
    assert await a.totals("bob") == UsageTotals(1, 7, 0, 7)
    assert await a.totals("nobody") == UsageTotals()


async def test_redis_down_drops_records_and_refuses_totals(
    conns: list[RedisConnection], redis_server: RedisServer
) -> None:
    usage = RedisUsage(conns[0])
    redis_server.stop()
    await usage.record("alice", Usage(1, 1, 2), streamed=True)  # logged, never raised
    with pytest.raises(RedisUnavailable) as exc:
        await usage.totals("alice")
    assert exc.value.status == 503
    for _ in range(200):  # the failure woke the monitor; its probe marks Redis down
        if conns[0].readiness() == "redis unreachable":
            break
        await asyncio.sleep(0.01)
    assert conns[0].readiness() == "redis unreachable"
