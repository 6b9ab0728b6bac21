"""Several gateway instances on one real Redis (`[limits].backend = "redis"`), over real
sockets: shared rpm and max_concurrent, a killed instance's slots coming back, Redis down at
start, Redis restarted mid-run, and the failure policy."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from tests.conftest import (
    Gateway,
    GatewayFactory,
    Upstream,
    chat_body,
)
from tests.gates import AUTH, Gates, key, open_stream, until
from tests.killable import ServeProcess, config_text
from tests.redis_server import RedisServer, redis_limits

ROOT = Path(__file__).parent.parent


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(
        f"{url}/v1/chat/completions", json=chat_body(stream=False), headers=AUTH
    ) as r:
        await r.read()
        return r.status


async def ready(http: aiohttp.ClientSession, gw: Gateway) -> bool:
    async with http.get(f"{gw.url}/readyz") as r:
        await r.read()
        return r.status == 200


async def admitted(http: aiohttp.ClientSession, url: str) -> bool:
    return await status_of(http, url) == 200


# ------------------------------------------------------------------------- shared limits


async def test_two_instances_share_one_rpm_budget(
    gateway_factory: GatewayFactory, upstream: Upstream, redis_url: str,
    http: aiohttp.ClientSession,
) -> None:
    sections = {"auth": {"mode": "keys"}, "limits": redis_limits(redis_url)}
    a = await gateway_factory(upstream.url, keys=key(rpm=1, burst=3), **sections)
    b = await gateway_factory(upstream.url, keys=key(rpm=1, burst=3), **sections)
    remaining = []
    for gw in (a, b, a):
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(), headers=AUTH) as r:
            assert r.status == 200
            remaining.append(r.headers["x-ratelimit-remaining-requests"])
            await r.read()
    assert remaining == ["2", "1", "0"]  # one budget, counted on both instances
    async with http.post(f"{b.url}/v1/chat/completions", json=chat_body(), headers=AUTH) as r:
        assert r.status == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["type"] == "rate_limit_error"


async def test_two_instances_share_max_concurrent(
    gateway_factory: GatewayFactory, gates: tuple[Gates, Upstream], redis_url: str,
    http: aiohttp.ClientSession,
) -> None:
    g, up = gates
    sections = {"auth": {"mode": "keys"}, "limits": redis_limits(redis_url)}
    a = await gateway_factory(up.url, keys=key(max_concurrent=2), **sections)
    b = await gateway_factory(up.url, keys=key(max_concurrent=2), **sections)
    s1 = await open_stream(http, a.url, "1")
    s2 = await open_stream(http, b.url, "2")
    assert (s1.status, s2.status) == (200, 200)
    s3 = await open_stream(http, a.url, "3")
    assert s3.status == 429 and int(s3.headers["Retry-After"]) >= 1
    s3.close()
    g.gates["2"].set()  # the stream on B ends: its slot is free for either instance
    assert (await s2.read()).endswith(b"data: [DONE]\n\n")
    s4: list[aiohttp.ClientResponse] = []

    async def admitted() -> bool:
        r = await open_stream(http, a.url, "4")
        if r.status != 200:
            r.close()
            return False
        s4.append(r)
        return True

    await until(admitted, timeout=5, every=0.05)
    for r in (s1, s2, *s4):
        r.close()


# ------------------------------------------------------------- a killed instance's slots


async def test_a_killed_instances_slots_come_back_within_the_lease(
    gateway_factory: GatewayFactory, gates: tuple[Gates, Upstream], redis_url: str,
    http: aiohttp.ClientSession,
    serve_process: ServeProcess,
) -> None:
    _, up = gates
    lease = 2.0
    sections: dict[str, Any] = {
        "auth": {"mode": "keys"},
        "limits": redis_limits(redis_url, lease_ttl=lease),
        "keys": key(max_concurrent=1),
    }
    proc = await serve_process(config_text(up.url, **sections))
    url = proc.url
    b = await gateway_factory(up.url, **sections)
    held = await open_stream(http, url, "held-forever")  # the process holds the one slot
    assert held.status == 200
    await asyncio.sleep(lease)  # past one lease: only the process's renewals keep it
    assert await status_of(http, b.url) == 429
    proc.send(signal.SIGKILL)  # no release, no cleanup: a crash
    await proc.wait_exit()
    killed = time.monotonic()
    assert await status_of(http, b.url) == 429  # still held: the lease has not run out
    await until(lambda: admitted(http, b.url), timeout=lease + 5, every=0.1)
    assert time.monotonic() - killed <= lease + 1.5
    held.close()


# ------------------------------------------------------------------- Redis comes and goes


async def test_redis_down_at_start_is_not_ready_then_recovers_without_restart(
    gateway_factory: GatewayFactory, upstream: Upstream, redis_server: RedisServer,
    redis_url: str, http: aiohttp.ClientSession,
) -> None:
    redis_server.stop()
    with capture_logs() as logs:
        gw = await gateway_factory(
            upstream.url, auth={"mode": "keys"}, keys=key(rpm=1, burst=1),
            limits=redis_limits(redis_url),
        )
    down = [e for e in logs if e["event"] == "redis_unreachable"]
    assert len(down) == 1 and "/readyz" in down[0]["detail"]
    async with http.get(f"{gw.url}/readyz") as r:
        assert r.status == 503
        assert "redis unreachable" in (await r.json())["reasons"]
    assert await status_of(http, gw.url) == 200  # limits fail open
    assert await status_of(http, gw.url) == 200  # (rpm 1 burst 1 would refuse this one)
    redis_server.start()
    await until(lambda: ready(http, gw), timeout=10, every=0.1)
    assert await status_of(http, gw.url) == 200
    assert await status_of(http, gw.url) == 429  # limits enforced again, through Redis


async def test_redis_restarted_mid_run_gateways_recover_and_share_again(
    gateway_factory: GatewayFactory, upstream: Upstream, redis_server: RedisServer,
    redis_url: str, http: aiohttp.ClientSession,
) -> None:
    sections = {"auth": {"mode": "keys"}, "limits": redis_limits(redis_url)}
    a = await gateway_factory(upstream.url, keys=key(rpm=1, burst=2), **sections)
    b = await gateway_factory(upstream.url, keys=key(rpm=1, burst=2), **sections)
    assert [await status_of(http, gw.url) for gw in (a, b, a)] == [200, 200, 429]
    redis_server.restart()  # every key is gone; pooled connections are dead
    # No gateway restart: the next requests reconnect, and the budget is shared again.
    assert [await status_of(http, gw.url) for gw in (b, a, b)] == [200, 200, 429]
    for gw in (a, b):
        await until(lambda gw=gw: ready(http, gw), timeout=5)


async def test_on_redis_error_closed_refuses_with_503(
    gateway_factory: GatewayFactory, upstream: Upstream, redis_server: RedisServer,
    redis_url: str, http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(
        upstream.url, auth={"mode": "keys"}, keys=key(rpm=600),
        limits=redis_limits(redis_url, on_redis_error="closed"),
    )
    assert await status_of(http, gw.url) == 200
    redis_server.stop()
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(stream=False), headers=AUTH
    ) as r:
        assert r.status == 503
        body = await r.json()
        assert body["error"]["type"] == "service_unavailable"
        assert body["error"]["code"] == "redis_unavailable"


async def test_a_running_relay_is_not_cut_when_redis_goes_away(
    gateway_factory: GatewayFactory, gates: tuple[Gates, Upstream], redis_server: RedisServer,
    redis_url: str, http: aiohttp.ClientSession,
) -> None:
    g, up = gates
    gw = await gateway_factory(
        up.url, auth={"mode": "keys"}, keys=key(rpm=600, tpm=100000, max_concurrent=4),
        limits=redis_limits(redis_url),
    )
    stream = await open_stream(http, gw.url, "s")
    assert stream.status == 200
    redis_server.stop()
    g.gates["s"].set()  # the rest arrives with Redis gone: tpm charge and release fail
    rest = await stream.read()
    assert rest.endswith(b"data: [DONE]\n\n") and b"error" not in rest
    assert await status_of(http, gw.url) == 200  # and new requests fail open


# ---------------------------------------------------------------------------- usage totals


async def usage_of(http: aiohttp.ClientSession, gw: Gateway) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{gw.url}/v1/usage", headers=AUTH) as r:
        return r.status, await r.json()


async def test_usage_totals_add_up_across_instances(
    gateway_factory: GatewayFactory, upstream: Upstream, redis_server: RedisServer,
    redis_url: str, http: aiohttp.ClientSession,
) -> None:
    sections = {"auth": {"mode": "keys"}, "limits": redis_limits(redis_url)}
    a = await gateway_factory(upstream.url, keys=key(), **sections)
    b = await gateway_factory(upstream.url, keys=key(), **sections)
    for gw in (a, b, b):
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(), headers=AUTH) as r:
            assert r.status == 200
            await r.read()

    async def three() -> bool:
        return (await usage_of(http, a))[1].get("requests") == 3

    await until(three, timeout=5)  # records are written when each request has ended
    status, totals = await usage_of(http, b)
    assert status == 200 and totals["client"] == "tester" and totals["requests"] == 3
    assert totals["total_tokens"] == totals["prompt_tokens"] + totals["completion_tokens"] > 0
    redis_server.stop()
    status, body = await usage_of(http, a)
    assert status == 503 and body["error"]["code"] == "redis_unavailable"
