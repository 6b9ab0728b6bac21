"""Timeouts, disconnects, heartbeats and bad input, end to end over real sockets."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import structlog
from aiohttp import web

from .conftest import GatewayFactory, StartUpstream, chat_body

ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def stalling_upstream(
    *, before_headers: float = 0.0, after_first: float = 0.0, gaps: tuple[float, ...] = ()
) -> tuple[web.Application, dict[str, asyncio.Event]]:
    """An upstream that stalls where told and records when its client went away."""
    events = {"closed": asyncio.Event(), "started": asyncio.Event()}

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(before_headers)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events["started"].set()
        try:
            await resp.write(ROLE)
            await asyncio.sleep(after_first)
            for gap in gaps:
                await asyncio.sleep(gap)
                await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')
            await resp.write(DONE)
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            events["closed"].set()
            raise
        return resp

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/v1/chat/completions", handler)
    return app, events


async def test_first_byte_timeout_answers_504_json(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http
) -> None:
    app, _ = stalling_upstream(before_headers=5)
    up = await start_upstream(app)
    gw = await gateway_factory(
        up.url, upstreams=[{"first_byte_timeout": 0.3}], retry={"attempts": 1}
    )
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 504
        err = await resp.json()
    assert err["error"]["type"] == "timeout"


async def test_idle_timeout_after_first_byte_ends_with_error_event(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http
) -> None:
    app, _ = stalling_upstream(after_first=5)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url, upstreams=[{"idle_timeout": 0.3}])
    with structlog.testing.capture_logs() as logs:
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200
            body = await resp.read()  # a clean end of response: no exception here
    assert body.startswith(ROLE)
    last = json.loads(body.rstrip(b"\n").split(b"\n")[-1].removeprefix(b"data: "))
    assert last["error"]["type"] == "timeout"
    access = [e for e in logs if e["event"] == "access"][-1]
    assert access["outcome"] == "timeout"


async def test_a_stream_that_never_pauses_still_ends_at_total_timeout(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http
) -> None:
    app, events = stalling_upstream(gaps=(0.05,) * 400)  # 20 s of events, never silent
    up = await start_upstream(app)
    gw = await gateway_factory(up.url, upstreams=[{"idle_timeout": 0.3, "total_timeout": 0.8}])
    t0 = time.monotonic()
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        body = await resp.read()
    elapsed = time.monotonic() - t0
    last = json.loads(body.rstrip(b"\n").split(b"\n")[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_timeout"
    assert body.count(b'"content":"x"') >= 5  # it flowed until the limit
    assert 0.8 <= elapsed < 3.0
    await asyncio.wait_for(events["closed"].wait(), 5)  # and the upstream was let go


async def test_a_slow_client_is_no_upstream_silence(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http
) -> None:
    """While the client does not read, the gateway stops reading the upstream (backpressure):
    the upstream is not silent, and its stream must not be cut as idle."""
    event = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"z" * 8000 + b'"}}]}\n\n'
    count = 4000  # 32 MB: more than the sockets between here and the client hold

    async def fast(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(count):
            await resp.write(event)
        await resp.write(DONE)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", fast)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url, upstreams=[{"idle_timeout": 0.3}])
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        await asyncio.sleep(1.5)  # the slow client: five idle timeouts without reading
        rest = await resp.read()
    assert first == event
    assert rest.count(b'"content":"z') == count - 1
    assert rest.endswith(DONE)


async def test_an_error_body_that_stalls_answers_a_stream_request_504(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http
) -> None:
    release = asyncio.Event()

    async def half_an_error(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=400, headers={"Content-Type": "application/json"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b'{"error":{"message":"bad')
        await release.wait()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", half_an_error)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url, upstreams=[{"idle_timeout": 0.3}], retry={"attempts": 1})
    try:
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 504
            assert (await resp.json())["error"]["type"] == "timeout"
    finally:
        release.set()


async def test_client_disconnect_closes_the_upstream_within_a_second(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory
) -> None:
    app, events = stalling_upstream(after_first=30)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url)
    with structlog.testing.capture_logs() as logs:
        session = aiohttp.ClientSession()
        resp = await session.post(f"{gw.url}/v1/chat/completions", json=chat_body())
        assert await resp.content.readuntil(b"\n\n") == ROLE
        await asyncio.wait_for(events["started"].wait(), 5)
        t0 = time.monotonic()
        resp.close()
        await session.close()
        await asyncio.wait_for(events["closed"].wait(), 1.0)
        assert time.monotonic() - t0 < 1.0
        for _ in range(100):  # the access line follows the cancellation
            if any(e["event"] == "access" for e in logs):
                break
            await asyncio.sleep(0.01)
    access = [e for e in logs if e["event"] == "access"][-1]
    assert access["outcome"] == "client_disconnected"
    tasks = [t for t in asyncio.all_tasks() if "relay" in repr(t.get_coro())]
    assert tasks == []


async def test_heartbeat_pings_only_while_upstream_is_silent(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http
) -> None:
    # 0.25 s between chunks with a 0.6 s heartbeat: no ping; then 1.5 s of silence: pings.
    app, _ = stalling_upstream(gaps=(0.25, 0.25, 0.25, 0.25, 1.5))
    up = await start_upstream(app)
    gw = await gateway_factory(up.url, sse={"heartbeat_interval": 0.6})
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        body = await resp.read()
    parts = body.split(b"\n\n")
    pings = [i for i, p in enumerate(parts) if p == b": ping"]
    assert pings, body
    # Every ping comes after the fourth content event, i.e. inside the long silence.
    content_idx = [i for i, p in enumerate(parts) if b'"content":"x"' in p]
    assert min(pings) > content_idx[3]
    assert len(pings) <= 2


@pytest.mark.parametrize(
    ("headers", "data", "status", "code"),
    [
        ({"Content-Type": "application/json"}, b"{not json", 400, "invalid_json"),
        ({"Content-Type": "application/json"}, b"[1, 2]", 400, None),
        ({"Content-Type": "text/plain"}, b"{}", 415, "unsupported_media_type"),
        (
            {},
            json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(),
            400,
            "missing_model",
        ),
        ({}, json.dumps({"model": "m", "messages": []}).encode(), 400, "invalid_messages"),
        (
            {},
            json.dumps({"model": "m", "messages": [{"role": "robot"}]}).encode(),
            400,
            "invalid_messages",
        ),
        ({}, json.dumps({"model": "m", "messages": ["hi"]}).encode(), 400, "invalid_messages"),
    ],
)
async def test_bad_requests_get_openai_shaped_errors(
    gateway, http, upstream, headers, data, status, code
) -> None:
    # No Content-Type at all (not aiohttp's default octet-stream) where the case has none.
    skip = () if headers else ("Content-Type",)
    async with http.post(
        f"{gateway.url}/v1/chat/completions", data=data, headers=headers, skip_auto_headers=skip
    ) as resp:
        assert resp.status == status
        err = await resp.json()
    assert set(err["error"]) == {"message", "type", "code"}
    assert err["error"]["type"] == "invalid_request_error"
    if code:
        assert err["error"]["code"] == code
    assert "Traceback" not in err["error"]["message"]
    assert upstream.state.requests["/v1/chat/completions"] == 0


async def test_body_over_max_body_bytes_is_413(
    gateway_factory: GatewayFactory, upstream, http
) -> None:
    gw = await gateway_factory(upstream.url, server={"max_body_bytes": 2048})
    big = chat_body(messages=[{"role": "user", "content": "x" * 4096}])
    async with http.post(f"{gw.url}/v1/chat/completions", json=big) as resp:
        assert resp.status == 413
        err = await resp.json()
    assert err["error"]["type"] == "invalid_request_error"


async def test_unknown_route_and_wrong_method_are_json(gateway, http) -> None:
    async with http.get(f"{gateway.url}/v1/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found_error"
    async with http.get(f"{gateway.url}/v1/chat/completions") as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]
        await resp.json()


async def test_upstream_unreachable_is_502(gateway_factory: GatewayFactory, http) -> None:
    gw = await gateway_factory("http://127.0.0.1:9/v1", retry={"attempts": 1})
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["type"] == "upstream_error"


async def test_upstream_closing_without_done_ends_with_error_event(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(ROLE)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url)
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        body = await resp.read()
    assert body.startswith(ROLE)
    assert b'"error"' in body.split(b"\n\n")[-2]
