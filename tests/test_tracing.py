"""Tracing: X-Request-ID, W3C traceparent, and request context on every log line."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.process.server import start
from tests.conftest import (
    TEST_KEY,
    Gateway,
    GatewayFactory,
    Upstream,
    chat_body,
    make_config,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize("rid", ["abc", "A.b_c-9", "x" * 128])
async def test_a_well_formed_request_id_is_kept_and_sent_upstream(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession, rid: str
) -> None:
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat_body(), headers={"X-Request-ID": rid}
    ) as r:
        await r.read()
        assert r.headers["X-Request-ID"] == rid
    assert upstream.state.last_headers["X-Request-ID"] == rid


@pytest.mark.parametrize("rid", ["", "x" * 129, "a b", "a/b", "é"])
async def test_a_malformed_request_id_is_replaced(
    gateway: Gateway, http: aiohttp.ClientSession, rid: str
) -> None:
    async with http.get(f"{gateway.url}/healthz", headers={"X-Request-ID": rid}) as r:
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])


async def test_every_response_carries_a_request_id(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        upstream.url, auth={"mode": "keys"}, cors={"allow_origins": ["http://a.example"]}
    )
    preflight = {"Origin": "http://a.example", "Access-Control-Request-Method": "POST"}
    calls = [
        http.get(f"{gw.url}/healthz"),
        http.get(f"{gw.url}/nope"),
        http.get(f"{gw.url}/v1/models"),  # 401
        http.options(f"{gw.url}/v1/models", headers=preflight),  # 204
        http.post(
            f"{gw.url}/v1/chat/completions",
            json=chat_body(),
            headers={"Authorization": f"Bearer {TEST_KEY}"},
        ),  # a stream
    ]
    for call in calls:
        async with call as r:
            await r.read()
            assert r.headers.get("X-Request-ID"), r.status


async def test_a_traceparent_is_continued_with_the_gateways_own_span(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat_body(), headers=headers
    ) as r:
        await r.read()
    sent = upstream.state.last_headers["traceparent"]
    version, trace, span, flags = sent.split("-")
    assert (version, trace, flags) == ("00", TRACE, "01")
    assert re.fullmatch(r"[0-9a-f]{16}", span) and span != PARENT


@pytest.mark.parametrize(
    "header", [None, "garbage", f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-{'0' * 16}-01"]
)
async def test_a_missing_or_invalid_traceparent_starts_a_new_trace(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession, header: str | None
) -> None:
    headers = {"traceparent": header} if header else {}
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat_body(), headers=headers
    ) as r:
        await r.read()
    sent = upstream.state.last_headers["traceparent"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", sent)
    assert TRACE not in sent and "0" * 32 not in sent



@pytest.fixture
async def gw_with_probe(upstream: Upstream) -> AsyncIterator[str]:
    """The real app plus one route that logs from inside a request."""

    async def probe(request: web.Request) -> web.Response:
        structlog.get_logger("probe").info("inside")
        return web.Response(text="ok")

    app = create_app(make_config(upstream.url, auth={"mode": "keys"}))
    app.router.add_get("/probe", probe)
    runner, port = await start(app, "127.0.0.1", 0, shutdown_timeout=2)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_every_line_of_a_request_carries_its_request_id_trace_id_and_client(
    captured: io.StringIO, gw_with_probe: str, http: aiohttp.ClientSession
) -> None:
    headers = {
        "Authorization": f"Bearer {TEST_KEY}",
        "X-Request-ID": "req-1",
        "traceparent": f"00-{TRACE}-{PARENT}-01",
    }
    async with http.get(f"{gw_with_probe}/probe", headers=headers) as r:
        assert r.status == 200
    lines = [orjson.loads(line) for line in captured.getvalue().splitlines()]
    mine = [e for e in lines if e.get("request_id") == "req-1"]
    assert {e["event"] for e in mine} == {"inside", "access"}
    for e in mine:
        assert (e["trace_id"], e["client"]) == (TRACE, "tester")
    access = next(e for e in mine if e["event"] == "access")
    assert access["ip"] == "127.0.0.1" and access["status"] == 200


async def test_one_access_line_per_stream_written_at_its_end_with_the_contract_fields(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    with capture_logs() as seen:
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat_body()) as r:
            await r.read()
    [line] = [e for e in seen if e["event"] == "access"]
    assert {
        "client",
        "model",
        "stream",
        "status",
        "outcome",
        "ttfb_ms",
        "duration_ms",
        "prompt_tokens",
        "completion_tokens",
        "upstream",
        "attempts",
    } <= set(line)
    assert (line["status"], line["outcome"], line["stream"]) == (200, "completed", True)
    assert line["completion_tokens"] == 5 and 0 <= line["ttfb_ms"] <= line["duration_ms"]


async def test_a_stream_cut_by_the_client_is_logged_once_as_client_disconnected(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    with capture_logs() as seen:
        r = await http.post(
            f"{gateway.url}/v1/chat/completions",
            json=chat_body(),
            headers={"x-mock-chunks": "500", "x-mock-delay": "0.02"},
        )
        await r.content.readline()
        r.close()
        deadline = asyncio.get_running_loop().time() + 10
        while not [e for e in seen if e["event"] == "access"]:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)  # the line is written by the server's own task
    [line] = [e for e in seen if e["event"] == "access"]
    assert line["outcome"] == "client_disconnected"


async def test_access_lines_carry_only_a_prefix_of_a_detached_streams_id(
    gateway: Gateway, http: aiohttp.ClientSession, captured: io.StringIO
) -> None:
    async with http.post(f"{gateway.url}/v1/streams", json=chat_body()) as r:
        assert r.status == 201
        sid = (await r.json())["id"]
    async with http.get(f"{gateway.url}/v1/streams/{sid}") as r:
        assert r.status == 200
        await r.read()
    async with http.delete(f"{gateway.url}/v1/streams/{sid}") as r:
        assert r.status in (204, 404)
    async with http.put(f"{gateway.url}/v1/streams/{sid}") as r:
        assert r.status == 405
    async with http.get(f"{gateway.url}/v1/streams/{sid}x") as r:
        assert r.status == 404
    text = captured.getvalue()
    lines = [orjson.loads(line) for line in text.splitlines()]
    paths = [e["path"] for e in lines if e["event"] == "access"]
    assert paths[0] == "/v1/streams"
    assert paths[1:] == [f"/v1/streams/{sid[:8]}\u2026"] * 4
    # Nowhere in any line: not in the access lines, not in the generation's own lines.
    assert sid[:9] not in text
