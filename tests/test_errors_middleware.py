"""The errors middleware: before a response starts, OpenAI JSON; after, one SSE error event
and a clean end of the response (never a second response, never a traceback)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.process.server import start
from gateway.usage.tap import UsageTap

from .conftest import Gateway, GatewayFactory, Upstream, chat_body, make_config

FIRST = b'data: {"n":1}\n\n'


async def faulty_after_prepare(request: web.Request) -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    await out.write(FIRST)
    raise RuntimeError("injected fault /tmp/secret-path")


async def faulty_before_prepare(request: web.Request) -> web.StreamResponse:
    raise RuntimeError("injected fault /tmp/secret-path")


@pytest.fixture
async def faulty_gateway(upstream: Upstream) -> AsyncIterator[int]:
    """The real app with two test-only routes that fail, served on a real port."""
    app = create_app(make_config(upstream.url))
    app.router.add_get("/test/fault-after", faulty_after_prepare)
    app.router.add_get("/test/fault-before", faulty_before_prepare)
    runner, port = await start(app, "127.0.0.1", 0, shutdown_timeout=2)
    yield port
    await runner.cleanup()


async def exchange(port: int, request: bytes) -> bytes:
    """Send one raw request with `Connection: close`; everything the server wrote."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read(-1)
    finally:
        writer.close()


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n", "the response must end with its last chunk"
            return out
        out += body[:size]
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


async def test_a_fault_after_the_stream_started_ends_it_with_an_error_event(
    faulty_gateway: int,
) -> None:
    raw = await exchange(
        faulty_gateway, b"GET /test/fault-after HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1" not in body, "a second response was written into the stream"
    assert b"Traceback" not in raw and b"secret-path" not in raw
    events = dechunk(body)
    assert events.startswith(FIRST)
    rest = events.removeprefix(FIRST)
    assert rest.startswith(b"data: ") and rest.endswith(b"\n\n") and rest.count(b"\n\n") == 1
    err = json.loads(rest.removeprefix(b"data: "))["error"]
    assert err["type"] == "server_error" and err["code"] == "internal_error"


async def test_a_fault_before_the_response_started_is_a_500_json(faulty_gateway: int) -> None:
    raw = await exchange(
        faulty_gateway, b"GET /test/fault-before HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ")
    assert json.loads(body)["error"]["type"] == "server_error"
    assert b"secret-path" not in raw


async def test_a_fault_in_the_relay_loop_ends_the_stream_cleanly(
    gateway_factory: GatewayFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = UsageTap.process
    calls = 0

    def process(self: UsageTap, block: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("injected fault in the relay loop")
        return original(self, block)

    monkeypatch.setattr(UsageTap, "process", process)
    gw: Gateway = await gateway_factory(upstream.url)
    body = json.dumps(chat_body(stream=True)).encode()
    raw = await exchange(
        gw.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        b"x-mock-delay: 0.01\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body,
    )
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1" not in rest and b"Traceback" not in raw
    events = dechunk(rest)
    last = events.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "internal_error"
    assert calls >= 2
