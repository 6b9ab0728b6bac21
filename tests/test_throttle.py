"""Throttling over real sockets: per-IP, rpm, tpm, max_concurrent, and slot release."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.limits import LIMITER
from gateway.limits.memory import MemoryLimiter
from tests.conftest import (
    Gateway,
    GatewayFactory,
    Upstream,
    chat_body,
)
from tests.gates import AUTH, Gates, key, open_stream, until


def held(gw: Gateway) -> int:
    limiter = gw.app[LIMITER]
    assert isinstance(limiter, MemoryLimiter)
    return limiter.held("conc:tester")


def assert_429(resp: aiohttp.ClientResponse) -> None:
    assert resp.status == 429
    retry = resp.headers["Retry-After"]
    assert retry.isdigit() and int(retry) >= 1


# ---------------------------------------------------------------------------- concurrency


async def test_a_third_stream_is_refused_at_max_concurrent_2_and_admitted_once_one_ends(
    gateway_factory: GatewayFactory, gates: tuple[Gates, Upstream], http: aiohttp.ClientSession
) -> None:
    g, up = gates
    gw = await gateway_factory(up.url, auth={"mode": "keys"}, keys=key(max_concurrent=2))
    a = await open_stream(http, gw.url, "a")
    b = await open_stream(http, gw.url, "b")
    assert (a.status, b.status) == (200, 200)
    with capture_logs() as logs:
        c = await open_stream(http, gw.url, "c")
    assert_429(c)
    assert (await c.json())["error"]["type"] == "rate_limit_error"
    assert [e["throttled"] for e in logs if e["event"] == "access"] == ["concurrency"]
    g.gates["a"].set()
    assert (await a.read()).endswith(b"data: [DONE]\n\n")
    await until(lambda: held(gw) == 1)
    d = await open_stream(http, gw.url, "d")
    assert d.status == 200
    for r in (a, b, c, d):
        r.close()


async def test_rate_limit_headers_are_on_a_stream_response(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(upstream.url, auth={"mode": "keys"}, keys=key(rpm=600))
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(), headers=AUTH) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["x-ratelimit-limit-requests"] == "600"
        assert r.headers["x-ratelimit-remaining-requests"] == "60"  # burst 61, one spent
        assert r.headers["x-ratelimit-reset-requests"].endswith("ms")
        await r.read()


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({}, 200),  # success
        ({"x-mock-status": "500"}, 500),  # upstream error, relayed after retries
        ({"x-mock-status": "429", "x-mock-retry-after": "1"}, 429),  # a 429 further down
        ({"x-mock-first-byte-delay": "1.5"}, 504),  # timeout
        ({"model": "forbidden-model"}, 403),  # an error raised by the handler
    ],
    ids=["success", "upstream-error", "upstream-429", "timeout", "handler-error"],
)
async def test_the_slot_is_released_on_every_exit(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    extra: dict[str, str],
    status: int,
) -> None:
    gw = await gateway_factory(
        upstream.url,
        auth={"mode": "keys"},
        keys=key(max_concurrent=1, models=["mock-*"]),
        retry={"attempts": 1},
        upstreams=[{"first_byte_timeout": 0.3}],
    )
    body = chat_body(stream=False, model=extra.pop("model", "mock-gpt"))
    for _ in range(2):  # the second would be refused 429 if the first kept its slot
        async with http.post(
            f"{gw.url}/v1/chat/completions", json=body, headers={**AUTH, **extra}
        ) as r:
            assert r.status == status
            await r.read()
        await until(lambda: held(gw) == 0)


async def test_the_slot_is_released_when_the_client_disconnects_mid_stream(
    gateway_factory: GatewayFactory, gates: tuple[Gates, Upstream], http: aiohttp.ClientSession
) -> None:
    _, up = gates
    gw = await gateway_factory(up.url, auth={"mode": "keys"}, keys=key(max_concurrent=1))
    a = await open_stream(http, gw.url, "never")
    assert held(gw) == 1
    a.close()  # the browser tab goes away; the gate never opens
    await until(lambda: held(gw) == 0)
    b = await open_stream(http, gw.url, "b")
    assert b.status == 200
    b.close()


# -------------------------------------------------------------------------------- rpm, tpm


async def test_rpm_exhaustion_is_429_and_recovers_after_retry_after(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(upstream.url, auth={"mode": "keys"}, keys=key(rpm=60, burst=3))
    url = f"{gw.url}/v1/models"
    remaining = []
    for _ in range(3):
        async with http.get(url, headers=AUTH) as r:
            assert r.status == 200
            remaining.append(r.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    async with http.get(url, headers=AUTH) as r:
        assert_429(r)
        assert r.headers["x-ratelimit-limit-requests"] == "60"
        assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
        wait = int(r.headers["Retry-After"])
    await asyncio.sleep(wait + 0.05)  # the limit is about time passing: let it pass
    async with http.get(url, headers=AUTH) as r:
        assert r.status == 200


async def test_a_client_over_its_tpm_waits(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(upstream.url, auth={"mode": "keys"}, keys=key(tpm=30))
    url = f"{gw.url}/v1/chat/completions"
    headers = {**AUTH, "x-mock-chunks": "40"}  # one answer spends more than a minute's budget
    async with http.post(url, json=chat_body(), headers=headers) as r:
        assert r.status == 200 and r.headers["x-ratelimit-limit-tokens"] == "30"
        await r.read()
    with capture_logs() as logs:
        async with http.post(url, json=chat_body(), headers=headers) as r:
            assert_429(r)
            assert int(r.headers["Retry-After"]) >= 20  # ~12 tokens over at 0.5 token/s
    assert [e["throttled"] for e in logs if e["event"] == "access"] == ["tpm"]


# ----------------------------------------------------------------------------------- per IP


async def test_per_ip_limit_refuses_a_flood_of_bad_keys_before_auth(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(upstream.url, auth={"mode": "keys"}, limits={"per_ip_rpm": 60})
    statuses = []
    with capture_logs() as logs:
        for i in range(9):
            async with http.get(
                f"{gw.url}/v1/models", headers={"Authorization": f"Bearer gw-bad-{i:040d}"}
            ) as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert_429(r)
    assert statuses == [401] * 7 + [429] * 2  # burst 1 + 60 // 10
    assert {e["throttled"] for e in logs if e.get("status") == 429} == {"ip_rpm"}


async def test_bad_keys_leave_no_limiter_state_behind(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(upstream.url, auth={"mode": "keys"})
    for i in range(50):
        async with http.get(f"{gw.url}/v1/models", headers={"x-api-key": f"gw-bad-{i:040d}"}) as r:
            assert r.status == 401
    limiter = gw.app[LIMITER]
    assert isinstance(limiter, MemoryLimiter) and len(limiter) == 0
