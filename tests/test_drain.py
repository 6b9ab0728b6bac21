"""SIGTERM's script, in process: readiness 503, no new work, in-flight streams finish within
the grace, the rest end with an error event and a clean end of response."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.mock_upstream import MockSettings, create_mock_app
from gateway.process import server
from gateway.process.drain import DRAIN, Drain
from gateway.process.server import FINISH_TIMEOUT, shutdown

from .conftest import (
    UPSTREAM_KEY,
    GatewayFactory,
    StartUpstream,
    Upstream,
    chat_body,
    make_config,
)


async def _slow_upstream(start_upstream: StartUpstream, chunks: int, delay: float) -> str:
    app = create_mock_app(MockSettings(chunks=chunks, delay=delay, api_key=UPSTREAM_KEY))
    return (await start_upstream(app)).url


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition no event announces (the listener closing), with a deadline."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_drain_lets_an_inflight_stream_finish_within_the_grace(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(await _slow_upstream(start_upstream, chunks=20, delay=0.05))
    loop = asyncio.get_running_loop()
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        await resp.content.readuntil(b"\n\n")  # the stream is running
        started = loop.time()
        stopping = asyncio.create_task(shutdown(gw.runner, gw.app, grace=20))
        body = await resp.content.read()
    await stopping
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in body
    # Shutdown ended as soon as the stream did, not at the end of the grace.
    assert loop.time() - started < 10


async def test_drain_turns_readyz_503_and_refuses_new_work_on_open_connections(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    # A stream long enough (4 s) to be still running while the probes go through.
    gw = await gateway_factory(await _slow_upstream(start_upstream, chunks=80, delay=0.05))
    # Two idle keep-alive connections opened before SIGTERM (as a load balancer's would be).
    probe_r, probe_w = await asyncio.open_connection("127.0.0.1", gw.port)
    work_r, work_w = await asyncio.open_connection("127.0.0.1", gw.port)
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        await resp.content.readuntil(b"\n\n")
        stopping = asyncio.create_task(shutdown(gw.runner, gw.app, grace=20))
        await _until(lambda: gw.app[DRAIN].draining and not gw.runner.sites)

        probe_w.write(b"GET /readyz HTTP/1.1\r\nHost: gw\r\n\r\n")
        head = await probe_r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert b"Connection: close" in head

        payload = json.dumps(chat_body()).encode()
        work_w.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        answer = await work_r.read()  # the gateway closes the connection after answering
        assert answer.startswith(b"HTTP/1.1 503")
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "draining" and error["type"] == "service_unavailable"

        # The listener is closed: a new connection is refused.
        try:
            _, w = await asyncio.open_connection("127.0.0.1", gw.port)
        except ConnectionRefusedError:
            pass
        else:
            w.close()
            raise AssertionError("a new connection was accepted while draining")
        body = await resp.content.read()
    await stopping
    assert body.endswith(b"data: [DONE]\n\n")
    for w in (probe_w, work_w):
        w.close()


async def test_drain_ends_streams_left_at_the_deadline_with_an_error_event(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    up = create_mock_app(MockSettings(chunks=2000, delay=0.02, api_key=UPSTREAM_KEY))
    upstream = await start_upstream(up)
    gw = await gateway_factory(upstream.url)
    loop = asyncio.get_running_loop()
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        await resp.content.readuntil(b"\n\n")
        started = loop.time()
        stopping = asyncio.create_task(shutdown(gw.runner, gw.app, grace=0.5))
        body = await resp.content.read()  # a clean end of response: no ClientPayloadError
    await stopping
    elapsed = loop.time() - started
    assert 0.5 <= elapsed < 0.5 + FINISH_TIMEOUT
    events = body.split(b"\n\n")
    assert events[-1] == b""
    last = events[-2]
    assert last.startswith(b"data: ")
    error = json.loads(last[len(b"data: "):])["error"]
    assert error["code"] == "gateway_shutting_down"
    assert error["type"] == "service_unavailable"
    assert b"[DONE]" not in body
    # Every event before the error is whole: cut only at event boundaries.
    assert all(e.startswith(b"data: {") for e in events[:-2])
    # The upstream request was closed, not left running.
    async with asyncio.timeout(5):
        await upstream.state.client_disconnected.wait()
    assert not gw.app[DRAIN].responses


def test_readiness_check_says_draining_only_after_begin() -> None:
    drain = Drain()
    assert drain.readiness() is None
    drain.begin()
    assert drain.readiness() == "draining"


async def test_hurry_ends_the_grace_at_once(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(await _slow_upstream(start_upstream, chunks=2000, delay=0.02))
    loop = asyncio.get_running_loop()
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        await resp.content.readuntil(b"\n\n")
        started = loop.time()
        stopping = asyncio.create_task(shutdown(gw.runner, gw.app, grace=60))
        await _until(lambda: gw.app[DRAIN].draining)
        gw.app[DRAIN].hurry()  # what a second SIGTERM / Ctrl-C does
        body = await resp.content.read()
    await stopping
    assert loop.time() - started < FINISH_TIMEOUT
    assert b'"gateway_shutting_down"' in body.rsplit(b"\n\n", 2)[-2]


async def _start_detached(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(f"{url}/v1/streams", json=chat_body()) as r:
        assert r.status == 201
        path: str = (await r.json())["url"]
        return url + path


async def test_drain_waits_for_a_detached_generation_within_the_grace(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    # 3 s of generation: longer than the app's own 2 s cleanup wait, shorter than the grace.
    gw = await gateway_factory(await _slow_upstream(start_upstream, chunks=60, delay=0.05))
    await _start_detached(http, gw.url)  # no reader attached: only the generation runs
    with capture_logs() as logs:
        await shutdown(gw.runner, gw.app, grace=20)
    # The generation was work in flight: the drain waited for it to finish.
    assert [e["stream_outcome"] for e in logs if e["event"] == "stream_ended"] == ["completed"]


async def test_at_the_deadline_detached_readers_get_fail_and_a_clean_end(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(
        create_mock_app(MockSettings(chunks=2000, delay=0.02, api_key=UPSTREAM_KEY))
    )
    gw = await gateway_factory(upstream.url)
    loop = asyncio.get_running_loop()
    stream = await _start_detached(http, gw.url)
    async with http.get(stream) as reader:
        await reader.content.readuntil(b"event: delta")
        started = loop.time()
        stopping = asyncio.create_task(shutdown(gw.runner, gw.app, grace=0.5))
        body = await reader.content.read()  # a clean end: no ClientPayloadError
    await stopping
    assert loop.time() - started < 0.5 + FINISH_TIMEOUT
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert b"event: fail" in last
    assert b'"shutdown"' in last
    async with asyncio.timeout(5):  # the upstream request was closed
        await upstream.state.client_disconnected.wait()


async def test_a_cleanup_that_hangs_cannot_hold_the_shutdown_past_its_bound(
    monkeypatch: pytest.MonkeyPatch, upstream: Upstream
) -> None:
    """Whatever a resource's cleanup does, shutdown ends within the grace + 2 * FINISH_TIMEOUT
    (systemd's TimeoutStopSec is set from that bound)."""
    monkeypatch.setattr(server, "FINISH_TIMEOUT", 0.3)
    app = create_app(make_config(upstream.url))
    never = asyncio.Event()

    async def stuck(_app: web.Application) -> AsyncIterator[None]:
        yield
        await never.wait()

    app.cleanup_ctx.append(stuck)
    runner, _port = await server.start(app, "127.0.0.1", 0, shutdown_timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with capture_logs() as logs:
        await asyncio.wait_for(server.shutdown(runner, app, grace=0.2), 10)
    assert loop.time() - started < 0.2 + 2 * 0.3 + 0.5
    assert [e for e in logs if e["event"] == "cleanup_timed_out"]
