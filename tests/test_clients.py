"""Misbehaving clients over raw sockets: each is dropped within a bound, holds bounded memory,
and the gateway keeps answering everyone else meanwhile."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import struct
import time
from collections.abc import MutableMapping
from typing import Any

import pytest
import structlog
from aiohttp import web

from .conftest import Gateway, GatewayFactory, StartUpstream, Upstream

REQUEST = json.dumps(
    {"model": "mock-gpt", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
).encode()


def rss() -> int:
    """Resident set size of this process (the gateway under test runs in it), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def post_head(length: int | None = None, extra: str = "") -> bytes:
    size = len(REQUEST) if length is None else length
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n{extra}\r\n"
    ).encode()


async def healthy(gw: Gateway) -> None:
    """A fresh connection gets /healthz 200 at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 200"), status


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """Read until the server closes; fail if it has not within `within` seconds."""
    data = b""
    async with asyncio.timeout(within):
        while True:
            try:
                got = await reader.read(65536)
            except ConnectionResetError:
                return data
            if not got:
                return data
            data += got


async def access_lines(
    logs: list[MutableMapping[str, Any]], n: int
) -> list[MutableMapping[str, Any]]:
    for _ in range(500):
        lines = [e for e in logs if e["event"] == "access"]
        if len(lines) >= n:
            return lines
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {n} access lines: {logs}")


async def test_slowloris_headers_are_cut_off_by_keepalive_timeout(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory(upstream.url, server={"keepalive_timeout": 1.5})
    head = post_head()
    before = rss()
    conns = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(50)]
    t0 = time.monotonic()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
        # A byte a second would take minutes; a byte every 0.25 s is as endless for a 1.5 s bound.
        async def drip() -> None:
            for b in head:
                writer.write(bytes([b]))
                await asyncio.sleep(0.25)

        dripping = asyncio.create_task(drip())
        try:
            await closed_by_server(reader, within=10)
        finally:
            dripping.cancel()
            writer.close()
        return time.monotonic() - t0

    tasks = [asyncio.create_task(trickle(r, w)) for r, w in conns]
    await asyncio.sleep(0.5)
    await healthy(gw)  # everyone else is served while the slow ones trickle
    took = await asyncio.gather(*tasks)
    assert max(took) < 1.5 + 3.0, took  # the bound plus scheduling margin
    assert min(took) >= 1.0, took  # and not before the bound
    assert rss() - before < 20 << 20
    await healthy(gw)
    await asyncio.sleep(0.1)
    assert len(gw.runner.server.connections) == 0


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_that_never_finishes_is_answered_408_after_body_timeout(
    gateway_factory: GatewayFactory, upstream: Upstream, framing: str
) -> None:
    gw = await gateway_factory(upstream.url, server={"body_timeout": 0.5})
    with structlog.testing.capture_logs() as logs:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        if framing == "chunked":
            head = post_head().replace(
                b"Content-Length: %d" % len(REQUEST), b"Transfer-Encoding: chunked"
            )
            writer.write(head + b"10\r\n" + REQUEST[:16] + b"\r\n")
        else:
            writer.write(post_head() + REQUEST[:10])
        t0 = time.monotonic()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 408"), status
        assert time.monotonic() - t0 < 0.5 + 2.0
        headers = await reader.readuntil(b"\r\n\r\n")
        length = int(headers.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        err = json.loads(await reader.readexactly(length))["error"]
        assert (err["type"], err["code"]) == ("invalid_request_error", "request_timeout")
        writer.close()
        line = (await access_lines(logs, 1))[0]
        assert (line["status"], line["outcome"]) == (408, "rejected")
    assert upstream.state.requests["/v1/chat/completions"] == 0
    await healthy(gw)


async def test_fifty_stalled_bodies_hold_memory_only_until_their_408(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    # What a stalled body may hold is bounded twice: max_body_bytes each, body_timeout long.
    gw = await gateway_factory(upstream.url, server={"body_timeout": 1.0})
    gc.collect()
    before = rss()
    part = b"x" * (200 << 10)

    async def stall() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(post_head(length=1 << 20) + part)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()

    t0 = time.monotonic()
    statuses = await asyncio.gather(*(stall() for _ in range(50)))
    assert all(s.startswith(b"HTTP/1.1 408") for s in statuses), set(statuses)
    assert time.monotonic() - t0 < 1.0 + 4.0
    await healthy(gw)
    gc.collect()
    assert rss() - before < 40 << 20  # 50 x 200 KiB were held for a second, then let go
    for _ in range(100):
        if not gw.runner.server.connections:
            break
        await asyncio.sleep(0.1)
    assert not gw.runner.server.connections
    assert upstream.state.requests["/v1/chat/completions"] == 0


def endless_upstream() -> tuple[web.Application, dict[str, Any]]:
    """An upstream that streams 1 KiB events as fast as it may, forever; counts what it wrote."""
    seen: dict[str, Any] = {"written": 0, "closed": asyncio.Event()}
    event = (
        b"data: " + json.dumps({"choices": [{"delta": {"content": "x" * 1000}}]}).encode() + b"\n\n"
    )

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            while True:
                await resp.write(event * 16)
                seen["written"] += len(event) * 16
        except (ConnectionError, asyncio.CancelledError):
            seen["closed"].set()
            raise

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/v1/chat/completions", handler)
    return app, seen


async def test_client_that_stops_reading_is_dropped_with_bounded_buffers(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory
) -> None:
    app, seen = endless_upstream()
    up = await start_upstream(app)
    gw = await gateway_factory(up.url, sse={"heartbeat_interval": 0.25, "write_timeout": 1.0})
    gc.collect()
    before = rss()
    with structlog.testing.capture_logs() as logs:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
        writer.write(post_head() + REQUEST)
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        await reader.readexactly(4096)  # it streams; now this client reads nothing more
        t0 = time.monotonic()
        await asyncio.wait_for(seen["closed"].wait(), 10)
        dropped_after = time.monotonic() - t0
        line = (await access_lines(logs, 1))[0]
        writer.close()
    # Dropped within write_timeout plus a heartbeat interval (plus scheduling margin), and
    # until then the stalled stream held little: kernel socket buffers and aiohttp's limits,
    # not the megabytes per second the upstream could produce.
    assert dropped_after < 1.0 + 0.25 + 3.0, dropped_after
    assert line["outcome"] == "client_disconnected"
    assert seen["written"] < 24 << 20, seen["written"]
    assert rss() - before < 40 << 20
    await healthy(gw)


async def test_thousands_of_connections_opened_and_dropped(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory(upstream.url)
    head = post_head()
    linger = struct.pack("ii", 1, 0)  # close with RST instead of FIN

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        match i % 4:
            case 1:
                writer.write(head[: i % len(head)])  # part of the headers
            case 2:
                writer.write(head + REQUEST[: i % len(REQUEST)])  # part of the body
            case 3:
                writer.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, linger
                )
        await writer.drain()
        writer.close()

    await healthy(gw)
    gc.collect()
    before = rss()
    total = 0
    for batch in range(15):
        await asyncio.gather(*(one(batch * 200 + i) for i in range(200)))
        total += 200
    await healthy(gw)
    for _ in range(200):  # the server notices each close on its own schedule
        if len(gw.runner.server.connections) == 0:
            break
        await asyncio.sleep(0.05)
    assert total == 3000
    assert len(gw.runner.server.connections) == 0
    gc.collect()
    assert rss() - before < 30 << 20
    assert upstream.state.open_streams == 0


async def test_detached_stream_reader_that_stops_reading_is_dropped(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory(upstream.url, sse={"heartbeat_interval": 0.25, "write_timeout": 1.0})
    big = {"x-mock-chunks": "4000", "x-mock-chunk-size": "200"}  # ~5 MB of deltas, at once
    body = json.dumps({"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    extra = "".join(f"{k}: {v}\r\n" for k, v in big.items())
    writer.write(post_head(len(body), extra).replace(b"/chat/completions", b"/streams", 1))
    writer.write(body.encode())
    assert (await reader.readline()).startswith(b"HTTP/1.1 201")
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    url = json.loads(await reader.readexactly(length))["url"]
    writer.close()
    with structlog.testing.capture_logs() as logs:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
        writer.write(f"GET {url} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        await reader.readexactly(4096)  # events flow; now this reader reads nothing more
        t0 = time.monotonic()
        got = await closed_by_server_unread(writer, within=1.0 + 0.25 + 4.0)
        took = time.monotonic() - t0
        lines = await access_lines(logs, 1)
    writer.close()
    assert got, "the gateway never dropped the stalled reader"
    assert took < 1.0 + 0.25 + 4.0, took
    assert lines[-1]["outcome"] == "client_disconnected"
    await healthy(gw)


async def closed_by_server_unread(writer: asyncio.StreamWriter, within: float) -> bool:
    """Wait, without reading, until the server has closed (or reset) this connection."""
    sock = writer.transport.get_extra_info("socket")
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        # TCP_INFO state (first byte): 1 ESTABLISHED; 7 CLOSE, 8 CLOSE_WAIT once the peer left.
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        if state != 1:
            return True
    return False
