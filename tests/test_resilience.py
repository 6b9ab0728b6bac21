"""Retries, failover and the circuit breaker, end to end against fault-injecting upstreams."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import structlog

from .conftest import GatewayFactory, StartUpstream, Upstream, chat_body
from .faulty import Faulty, Step, dead_url
from .gates import Gates, open_stream

FAST = {"backoff_initial": 0.001, "backoff_max": 0.4}


async def test_503_503_200_succeeds_after_two_retries_honouring_retry_after(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    faulty = Faulty([Step(503, "1"), Step(503, "1")])
    up = await start_upstream(faulty.app())
    gw = await gateway_factory(up.url, retry={"attempts": 3, **FAST})
    with structlog.testing.capture_logs() as logs:
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200
            body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n")
    assert faulty.requests == 3
    gaps = [b - a for a, b in zip(faulty.arrivals, faulty.arrivals[1:], strict=False)]
    # Jitter alone would wait at most 2 ms; Retry-After: 1 is honoured, capped at backoff_max.
    assert all(0.39 <= g < 0.9 for g in gaps), gaps
    (access,) = [e for e in logs if e["event"] == "access"]
    assert (access["attempts"], access["status"], access["upstream"]) == (3, 200, "mock")


async def test_retries_exhausted_on_5xx_relay_the_last_answer_as_sent(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    faulty = Faulty([Step(500), Step(502), Step(503)])
    up = await start_upstream(faulty.app())
    gw = await gateway_factory(up.url, retry={"attempts": 3, **FAST})
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["message"] == "scripted 503"
    assert faulty.requests == 3


async def test_client_errors_are_relayed_without_a_retry(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    faulty = Faulty([Step(400)])
    up = await start_upstream(faulty.app())
    gw = await gateway_factory(up.url, retry={"attempts": 3, **FAST})
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 400
    assert faulty.requests == 1


async def test_dead_first_upstream_fails_over_to_the_second(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    faulty = Faulty()
    up = await start_upstream(faulty.app())
    gw = await gateway_factory(
        up.url,
        retry={"attempts": 2, "backoff_initial": 5.0, "backoff_max": 5.0},
        upstreams=[
            {"name": "dead", "base_url": dead_url(), "priority": 0},
            {"name": "live", "priority": 1},
        ],
    )
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(stream=False)) as resp:
            assert resp.status == 200
        # Failover to another upstream does not wait out the (5 s) backoff.
        assert time.monotonic() - started < 2.0
    assert faulty.requests == 1
    (access,) = [e for e in logs if e["event"] == "access"]
    assert (access["upstream"], access["attempts"]) == ("live", 2)


async def test_lower_priority_upstream_is_used_only_when_needed(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    first, second = Faulty(), Faulty()
    up1, up2 = await start_upstream(first.app()), await start_upstream(second.app())
    gw = await gateway_factory(
        up1.url,
        upstreams=[{"name": "b", "base_url": up2.url, "priority": 1}, {"name": "a", "priority": 0}],
    )
    for _ in range(4):
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(stream=False)) as resp:
            assert resp.status == 200
    assert (first.requests, second.requests) == (4, 0)


async def test_weight_spreads_requests_among_equal_priorities(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    heavy, light = Faulty(), Faulty()
    up1, up2 = await start_upstream(heavy.app()), await start_upstream(light.app())
    gw = await gateway_factory(
        up1.url,
        upstreams=[
            {"name": "heavy", "weight": 9},
            {"name": "light", "base_url": up2.url, "weight": 1},
        ],
    )
    for _ in range(60):
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(stream=False)) as resp:
            assert resp.status == 200
    # Expected 54 : 6; the bounds are many standard deviations wide.
    assert heavy.requests > 40 and light.requests >= 1


async def test_models_pattern_chooses_the_upstream(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gpt, other = Faulty(), Faulty()
    up1, up2 = await start_upstream(gpt.app()), await start_upstream(other.app())
    gw = await gateway_factory(
        up1.url,
        upstreams=[
            {"name": "gpt", "models": ["mock-gpt*"], "priority": 5},
            {"name": "other", "base_url": up2.url, "models": ["llama*"]},
        ],
    )
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(stream=False)) as resp:
        assert resp.status == 200
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(stream=False, model="llama-3")
    ) as resp:
        assert resp.status == 200
    assert (gpt.requests, other.requests) == (1, 1)


async def test_open_breaker_answers_503_at_once_and_the_upstream_sees_nothing(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    faulty = Faulty([Step(500)] * 3)
    up = await start_upstream(faulty.app())
    gw = await gateway_factory(
        up.url, retry={"attempts": 1}, breaker={"failure_threshold": 3, "cooldown": 60.0}
    )
    url = f"{gw.url}/v1/chat/completions"
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            async with http.post(url, json=chat_body(stream=False)) as resp:
                assert resp.status == 500  # relayed as sent
    assert faulty.requests == 3
    assert [(e["old"], e["new"]) for e in logs if e["event"] == "breaker_state"] == [
        ("closed", "open")
    ]
    elapsed = []
    for _ in range(5):
        started = time.perf_counter()
        async with http.post(url, json=chat_body(stream=False)) as resp:
            body = await resp.json()
        elapsed.append(time.perf_counter() - started)
        assert resp.status == 503
        assert body["error"]["code"] == "upstream_unavailable"
        assert int(resp.headers["Retry-After"]) >= 1
    assert faulty.requests == 3  # not one connect while open
    # Under 10 ms (the best of five; a shared CI machine may stall any single request).
    assert min(elapsed) < 0.010, elapsed


async def test_after_cooldown_one_probe_goes_through_and_its_success_closes_the_breaker(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    faulty = Faulty([Step(502)] * 2)
    up = await start_upstream(faulty.app())
    gw = await gateway_factory(
        up.url, retry={"attempts": 1}, breaker={"failure_threshold": 2, "cooldown": 0.3}
    )
    url = f"{gw.url}/v1/chat/completions"
    for _ in range(2):
        async with http.post(url, json=chat_body(stream=False)) as resp:
            assert resp.status == 502
    await asyncio.sleep(0.35)  # the cooldown itself is what is under test
    faulty.hold = asyncio.Event()
    faulty.arrived.clear()
    with structlog.testing.capture_logs() as logs:
        probe = asyncio.ensure_future(http.post(url, json=chat_body(stream=False)))
        await faulty.arrived.wait()
        # While the probe is out, the breaker is half-open: nobody else gets through.
        async with http.post(url, json=chat_body(stream=False)) as resp:
            assert resp.status == 503
        assert faulty.requests == 3
        faulty.hold.set()
        async with await probe as resp:
            assert resp.status == 200
    states = [(e["old"], e["new"]) for e in logs if e["event"] == "breaker_state"]
    assert states == [("open", "half_open"), ("half_open", "closed")]
    for _ in range(3):  # closed again: everyone goes through
        async with http.post(url, json=chat_body(stream=False)) as resp:
            assert resp.status == 200
    assert faulty.requests == 6


async def test_failed_probe_reopens_the_breaker(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    faulty = Faulty([Step(500)] * 3)
    up = await start_upstream(faulty.app())
    gw = await gateway_factory(
        up.url, retry={"attempts": 1}, breaker={"failure_threshold": 2, "cooldown": 0.3}
    )
    url = f"{gw.url}/v1/chat/completions"
    for _ in range(2):
        async with http.post(url, json=chat_body(stream=False)) as resp:
            assert resp.status == 500
    await asyncio.sleep(0.35)
    async with http.post(url, json=chat_body(stream=False)) as resp:
        assert resp.status == 500  # the probe, failed
    async with http.post(url, json=chat_body(stream=False)) as resp:
        assert resp.status == 503
    assert faulty.requests == 3


async def test_429_is_retried_but_never_opens_the_breaker(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    faulty = Faulty([Step(429, "0"), Step(429, "0"), Step(429, "0"), Step(429, "0")])
    up = await start_upstream(faulty.app())
    gw = await gateway_factory(
        up.url, retry={"attempts": 2, **FAST}, breaker={"failure_threshold": 1, "cooldown": 60.0}
    )
    url = f"{gw.url}/v1/chat/completions"
    for _ in range(2):
        async with http.post(url, json=chat_body(stream=False)) as resp:
            assert resp.status == 429
            # The upstream's answer as sent, but Retry-After an integer >= 1 like every 429.
            assert resp.headers["Retry-After"] == "1"
    async with http.post(url, json=chat_body(stream=False)) as resp:
        assert resp.status == 200
    assert faulty.requests == 5


@pytest.mark.parametrize(
    ("sent", "relayed"), [(None, "1"), ("0", "1"), ("2", "2"), ("2.5", "3"), ("soon", "1")]
)
@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_429_relayed_has_an_integer_retry_after_of_at_least_one(
    sent: str | None,
    relayed: str,
    stream: bool,
    start_upstream: StartUpstream,
    gateway_factory: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    faulty = Faulty([Step(429, sent)])
    up = await start_upstream(faulty.app())
    gw = await gateway_factory(up.url, retry={"attempts": 1, **FAST})
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(stream=stream)) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == relayed
        assert (await resp.json())["error"]["code"] == "scripted"  # the body as sent


async def test_breaker_skips_an_open_upstream_and_uses_the_next(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    bad, good = Faulty([Step(500)]), Faulty()
    up1, up2 = await start_upstream(bad.app()), await start_upstream(good.app())
    gw = await gateway_factory(
        up1.url,
        retry={"attempts": 2, **FAST},
        breaker={"failure_threshold": 1, "cooldown": 60.0},
        upstreams=[
            {"name": "bad", "priority": 0},
            {"name": "good", "base_url": up2.url, "priority": 1},
        ],
    )
    for _ in range(3):
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(stream=False)) as resp:
            assert resp.status == 200
    assert (bad.requests, good.requests) == (1, 3)


async def test_max_connections_holds_per_upstream(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    faulty = Faulty()
    faulty.hold = asyncio.Event()
    up = await start_upstream(faulty.app())
    # Two upstreams on one host:port, so the shared connector's limit_per_host (the larger
    # max_connections, 3) cannot be what holds "a" to its own 2.
    gw = await gateway_factory(
        up.url,
        upstreams=[
            {"name": "a", "max_connections": 2},
            {"name": "b", "max_connections": 3, "priority": 1},
        ],
    )
    url = f"{gw.url}/v1/chat/completions"
    calls = [asyncio.ensure_future(http.post(url, json=chat_body())) for _ in range(5)]
    while faulty.requests < 2:
        faulty.arrived.clear()
        await faulty.arrived.wait()
    await asyncio.sleep(0.2)  # room for a third request to arrive, were the limit broken
    assert faulty.requests == 2
    faulty.hold.set()
    for call in calls:
        async with await call as resp:
            assert resp.status == 200
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert faulty.requests == 5 and faulty.max_in_flight == 2


async def test_first_byte_timeout_is_retried_on_the_next_upstream(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    slow, fast = Faulty(), Faulty()
    slow.hold = asyncio.Event()  # never set: no headers ever
    up1, up2 = await start_upstream(slow.app()), await start_upstream(fast.app())
    gw = await gateway_factory(
        up1.url,
        retry={"attempts": 2, **FAST},
        upstreams=[
            {"name": "slow", "first_byte_timeout": 0.2},
            {"name": "fast", "base_url": up2.url, "priority": 1},
        ],
    )
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert (slow.requests, fast.requests) == (1, 1)
    async with http.get(f"{gw.url}/metrics") as resp:
        text = await resp.text()
    assert 'gateway_upstream_attempts_total{outcome="timeout",upstream="slow"} 1.0' in text


async def test_no_retry_once_the_first_byte_reached_the_client(
    upstream: Upstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(upstream.url, retry={"attempts": 3, **FAST})
    headers = {"x-mock-fail-after": "2"}  # two events, then the upstream aborts
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(), headers=headers
    ) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert body.count(b"data: ") == 3 and b'"error"' in body.split(b"\n\n")[-2]
    assert upstream.state.requests["/v1/chat/completions"] == 1


async def test_waiting_for_a_local_connection_slot_never_opens_the_breaker(
    gates: tuple[Gates, Upstream], gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # All max_connections held by a healthy upstream's long stream: a request that waited
    # first_byte_timeout for a slot of ours was given to the breaker as the upstream's
    # timeout, and opened it: the healthy upstream was refused for the whole cooldown.
    g, up = gates
    gw = await gateway_factory(
        up.url,
        retry={"attempts": 1},
        breaker={"failure_threshold": 1, "cooldown": 600},
        upstreams=[{"max_connections": 1, "first_byte_timeout": 0.3}],
    )
    held = await open_stream(http, gw.url, "long")
    assert held.status == 200
    url = f"{gw.url}/v1/chat/completions"
    async with http.post(url, json=chat_body(stream=False)) as r:
        assert r.status == 504  # no slot within first_byte_timeout
    g.gates["long"].set()
    assert (await held.read()).endswith(b"data: [DONE]\n\n")
    held.release()
    async with http.post(url, json=chat_body(stream=False)) as r:
        assert r.status == 200, await r.text()
    async with http.get(f"{gw.url}/metrics") as r:
        assert 'gateway_breaker_state{upstream="mock"} 0.0' in await r.text()
