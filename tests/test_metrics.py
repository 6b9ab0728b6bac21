"""/metrics: Prometheus text whose counts match the traffic sent, for allowed peers only."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.exchange import Exchange
from gateway.metrics import METRICS, Metrics

from .conftest import Gateway, GatewayFactory, StartUpstream, Upstream, chat_body, make_config
from .faulty import USAGE, Faulty, Step
from .redis_server import RedisServer, redis_limits

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, gw: Gateway) -> Samples:
    async with http.get(f"{gw.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_counts_match_the_traffic_sent(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    faulty = Faulty([Step(503, "0")])
    up = await start_upstream(faulty.app())
    gw = await gateway_factory(up.url, retry={"attempts": 2, "backoff_initial": 0.001})
    url = f"{gw.url}/v1/chat/completions"
    for stream in (True, True, True, False, False):
        async with http.post(url, json=chat_body(stream=stream)) as resp:
            assert resp.status == 200
            await resp.read()
    async with http.get(f"{gw.url}/nowhere") as resp:
        assert resp.status == 404
    async with http.post(url, data=b"[]", headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
    m = await scrape(http, gw)
    route = "/v1/chat/completions"
    assert value(m, "gateway_requests_total", route=route, status="200") == 5
    assert value(m, "gateway_requests_total", route=route, status="400") == 1
    assert value(m, "gateway_requests_total", route="unmatched", status="404") == 1
    assert value(m, "gateway_request_duration_seconds_count") == 7
    assert value(m, "gateway_ttfb_seconds_count") == 7
    assert value(m, "gateway_upstream_attempts_total", upstream="mock", outcome="ok") == 5
    assert value(m, "gateway_upstream_attempts_total", upstream="mock", outcome="server_error") == 1
    assert value(m, "gateway_retries_total") == 1
    assert value(m, "gateway_active_streams") == 0
    assert value(m, "gateway_breaker_state", upstream="mock") == 0
    assert (
        value(m, "gateway_tokens_total", client="anonymous", kind="prompt")
        == 5 * USAGE["prompt_tokens"]
    )
    assert (
        value(m, "gateway_tokens_total", client="anonymous", kind="completion")
        == 5 * USAGE["completion_tokens"]
    )
    assert value(m, "gateway_client_disconnects_total") == 0


async def test_breaker_state_gauge_follows_the_breaker(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    up = await start_upstream(Faulty([Step(500)]).app())
    gw = await gateway_factory(up.url, retry={"attempts": 1}, breaker={"failure_threshold": 1})
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 500
    m = await scrape(http, gw)
    assert value(m, "gateway_breaker_state", upstream="mock") == 2
    assert value(m, "gateway_upstream_attempts_total", upstream="mock", outcome="server_error") == 1


async def test_active_streams_and_client_disconnects(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    closed = asyncio.Event()

    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')
        try:
            await asyncio.Event().wait()
        finally:
            closed.set()
        return resp

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/v1/chat/completions", stalls)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url)
    async with aiohttp.ClientSession() as own:
        resp = await own.post(f"{gw.url}/v1/chat/completions", json=chat_body())
        await resp.content.readuntil(b"\n\n")
        assert value(await scrape(http, gw), "gateway_active_streams") == 1
        resp.close()
    await asyncio.wait_for(closed.wait(), 5)
    async with asyncio.timeout(5):
        while value(m := await scrape(http, gw), "gateway_client_disconnects_total") == 0:
            await asyncio.sleep(0.01)
    assert value(m, "gateway_active_streams") == 0
    assert value(m, "gateway_client_disconnects_total") == 1
    assert value(m, "gateway_requests_total", route="/v1/chat/completions", status="200") == 1


async def test_metrics_are_refused_to_peers_not_allowed(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory("http://127.0.0.1:9/v1", metrics={"allow": ["10.0.0.0/8"]})
    async with http.get(f"{gw.url}/metrics") as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "metrics_forbidden"


async def test_metrics_are_refused_to_a_request_a_proxy_relayed(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # Behind nginx every peer is 127.0.0.1, which is both allowed to scrape and a trusted
    # proxy: what tells a relayed request apart is the header the proxy adds.
    gw = await gateway_factory("http://127.0.0.1:9/v1")
    for header in ("X-Forwarded-For", "Forwarded"):
        value = "203.0.113.9" if header == "X-Forwarded-For" else "for=203.0.113.9"
        async with http.get(f"{gw.url}/metrics", headers={header: value}) as resp:
            assert resp.status == 403, header
            body = await resp.json()
        assert body["error"]["code"] == "metrics_forbidden"
        assert "gateway_requests_total" not in str(body)
    async with http.get(f"{gw.url}/metrics") as resp:
        assert resp.status == 200


async def test_metrics_path_comes_from_config(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory("http://127.0.0.1:9/v1", metrics={"path": "/internal/prom"})
    async with http.get(f"{gw.url}/internal/prom") as resp:
        assert resp.status == 200
        assert "gateway_requests_total" in await resp.text()
    async with http.get(f"{gw.url}/metrics") as resp:
        assert resp.status == 404


def test_each_app_has_its_own_registry() -> None:
    cfg = make_config("http://127.0.0.1:9/v1")
    a, b = create_app(cfg), create_app(cfg)
    assert a[METRICS].registry is not b[METRICS].registry


def test_client_label_is_bounded_to_configured_names() -> None:
    cfg = make_config("http://127.0.0.1:9/v1", keys=[{"client": "alice", "sha256": "0" * 64}])
    metrics = Metrics(cfg)
    assert metrics.client_label("alice") == "alice"
    assert metrics.client_label("anonymous") == "anonymous"
    assert metrics.client_label("some-jwt-subject-123") == "jwt"


def test_throttled_requests_are_counted_by_reason() -> None:
    metrics = Metrics(make_config("http://127.0.0.1:9/v1"))
    request = make_mocked_request("POST", "/v1/chat/completions")
    for status, reason in ((429, "rpm"), (429, "rpm"), (429, "tpm"), (200, None), (503, "redis")):
        ex = Exchange("r", "t" * 32, "s" * 16, "01", 0.0, status=status, reason=reason)
        metrics.finished(request, ex, 0.5)
    got = {
        s.labels["reason"]: s.value
        for s in next(iter(metrics.throttled.collect())).samples
        if s.name.endswith("_total")
    }
    assert got == {"rpm": 2, "tpm": 1}


async def test_redis_up_follows_redis_and_is_absent_without_it(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    redis_server: RedisServer,
    redis_url: str,
    http: aiohttp.ClientSession,
) -> None:
    memory = await gateway_factory(upstream.url)
    assert not [k for k in await scrape(http, memory) if k[0] == "gateway_redis_up"]
    gw = await gateway_factory(upstream.url, limits=redis_limits(redis_url))
    assert (await scrape(http, gw))[("gateway_redis_up", frozenset())] == 1.0
    redis_server.stop()
    try:
        async with asyncio.timeout(30):  # the monitor probes every second
            while (await scrape(http, gw))[("gateway_redis_up", frozenset())] != 0.0:
                await asyncio.sleep(0.1)
    finally:
        redis_server.start()
    async with asyncio.timeout(30):
        while (await scrape(http, gw))[("gateway_redis_up", frozenset())] != 1.0:
            await asyncio.sleep(0.1)


async def test_metrics_are_refused_through_a_proxy_that_sends_only_x_real_ip_or_via(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # `proxy_set_header X-Real-IP $remote_addr;` alone is a common nginx setup, and Via is
    # the header RFC 9110 (7.6.3) has every proxy add: either one marks a relayed request.
    gw = await gateway_factory("http://127.0.0.1:9/v1")
    for header, value in (("X-Real-IP", "203.0.113.9"), ("Via", "1.1 proxy.example")):
        async with http.get(f"{gw.url}/metrics", headers={header: value}) as resp:
            assert resp.status == 403, header
            assert "gateway_requests_total" not in await resp.text()
