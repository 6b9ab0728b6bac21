"""/healthz is liveness: probes, the metrics scrape and the demo page never wait on the limiter,
so a Redis outage (even with on_redis_error = "closed") does not make the process look dead."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from gateway.limits import LIMITER

from .conftest import TEST_KEY, GatewayFactory, Upstream, chat_body
from .redis_server import RedisServer

UNMETERED = ["/healthz", "/readyz", "/metrics", "/", "/static/demo.js", "/demo/config"]


async def test_healthz_is_200_while_redis_is_down_with_on_redis_error_closed(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    redis_server: RedisServer,
    redis_url: str,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(
        upstream.url,
        auth={"mode": "keys"},
        limits={
            "backend": "redis",
            "redis_url": redis_url,
            "on_redis_error": "closed",
            "per_ip_rpm": 600,
        },
    )
    async with http.get(f"{gw.url}/healthz") as r:
        assert r.status == 200
    redis_server.stop()
    auth = {"Authorization": f"Bearer {TEST_KEY}"}
    async with asyncio.timeout(20):  # an upper bound only
        # The limiter is really refusing: relayed work is 503 ...
        async with http.post(
            f"{gw.url}/v1/chat/completions", json=chat_body(stream=False), headers=auth
        ) as r:
            assert r.status == 503
        # ... while liveness, the scrape and the demo page are served.
        for path in ("/healthz", "/metrics", "/", "/static/demo.js", "/demo/config"):
            async with http.get(gw.url + path) as r:
                assert r.status == 200, path
        async with http.get(f"{gw.url}/readyz") as r:
            assert r.status in (200, 503)  # readiness may say Redis is down: it answers


async def test_probes_and_the_demo_page_never_touch_the_limiter(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = await gateway_factory(upstream.url, limits={"per_ip_rpm": 600})
    limiter = gw.app[LIMITER]
    keys: list[str] = []
    original = limiter.hit

    async def hit(key: str, rate: object) -> object:
        keys.append(key)
        return await original(key, rate)  # type: ignore[arg-type]

    monkeypatch.setattr(limiter, "hit", hit)
    for path in UNMETERED:
        async with http.get(gw.url + path) as r:
            assert r.status in (200, 503), path
    assert keys == []
    async with http.get(f"{gw.url}/v1/models") as r:  # relayed work is still counted
        assert r.status == 200
    assert keys == ["ip:127.0.0.1"]
