"""/v1/streams over real sockets: start, follow, resume, stop, expire."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.identity import Identity
from gateway.mock_upstream import MockSettings, create_mock_app, reply_pieces
from gateway.process.server import start
from gateway.sse import EventSplitter, iter_events, parse_event
from gateway.state import IDENTITY, SLOT
from gateway.streams.handlers import FOLLOWERS
from gateway.streams.log import EVENT_LOG, MemoryEventLog
from gateway.streams.registry import STREAM_TASKS
from gateway.usage import USAGE
from gateway.usage.tap import Usage

from .conftest import (
    TEST_KEY,
    TEST_KEY_SHA,
    Gateway,
    GatewayFactory,
    StartUpstream,
    Upstream,
    chat_body,
    make_config,
)
from .test_metrics import scrape, value

PROMPT = "hello there"


@dataclass
class Event:
    id: int
    kind: str
    data: Any


@dataclass
class Read:
    status: int
    retry: int | None = None
    events: list[Event] = field(default_factory=list)
    pings: int = 0
    raw: bytes = b""


async def start_stream(
    http: aiohttp.ClientSession, gw: Gateway, headers: dict[str, str] | None = None, **body: Any
) -> str:
    async with http.post(f"{gw.url}/v1/streams", json=chat_body(**body), headers=headers) as r:
        assert r.status == 201, await r.text()
        data = await r.json()
    assert data["url"] == f"/v1/streams/{data['id']}"
    return str(data["url"])


async def read_stream(
    http: aiohttp.ClientSession,
    gw: Gateway,
    url: str,
    *,
    last: int | None = None,
    query: bool = False,
    stop_after: int | None = None,
) -> Read:
    """GET the stream to its end (or `stop_after` events) and parse what came."""
    headers, params = {}, {}
    if last is not None:
        if query:
            params["last_event_id"] = str(last)
        else:
            headers["Last-Event-ID"] = str(last)
    async with http.get(gw.url + url, headers=headers, params=params) as r:
        out = Read(r.status)
        if r.status != 200:
            out.raw = await r.read()
            return out
        assert r.headers["Content-Type"] == "text/event-stream"
        assert r.headers["Cache-Control"] == "no-cache"
        splitter = EventSplitter()
        async for chunk in r.content.iter_any():
            out.raw += chunk
            for raw in iter_events(splitter.feed(chunk)):
                if raw.startswith(b": ping"):
                    out.pings += 1
                ev = parse_event(raw)
                if ev is None:
                    continue
                if ev.retry is not None and ev.data is None:
                    assert not out.events, "retry: comes first"
                    out.retry = ev.retry
                    continue
                assert ev.id is not None and ev.event is not None
                out.events.append(Event(int(ev.id), ev.event, orjson.loads(ev.data or "")))
                if stop_after is not None and len(out.events) >= stop_after:
                    return out
    return out


def text_of(events: list[Event]) -> str:
    return "".join(e.data.get("content", "") for e in events if e.kind == "delta")


@pytest.fixture
async def slow_upstream(start_upstream: StartUpstream) -> Upstream:
    """30 chunks 0.1 s apart: a three-second stream."""
    return await start_upstream(create_mock_app(MockSettings(chunks=30, delay=0.1)))


async def test_post_answers_201_with_an_unguessable_id_and_its_url(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    async with http.post(f"{gateway.url}/v1/streams", json=chat_body()) as r:
        assert r.status == 201
        body = await r.json()
        assert r.headers["Location"] == body["url"]
    assert body["url"] == f"/v1/streams/{body['id']}"
    assert len(body["id"]) >= 22  # >= 128 bits of url-safe base64
    got = await read_stream(http, gateway, body["url"])  # let it end before teardown
    assert got.events[-1].kind == "done"


async def test_stream_sends_retry_then_numbered_delta_usage_done(
    http: aiohttp.ClientSession, gateway: Gateway, upstream: Upstream
) -> None:
    url = await start_stream(http, gateway)
    got = await read_stream(http, gateway, url)
    assert got.status == 200 and got.retry == 3000
    assert got.raw.startswith(b"retry: 3000\n\n")
    assert [e.id for e in got.events] == list(range(1, len(got.events) + 1))
    assert text_of(got.events) == "".join(reply_pieces(PROMPT, 5, 1))
    kinds = [e.kind for e in got.events]
    assert kinds[-2:] == ["usage", "done"] and set(kinds[:-2]) == {"delta"}
    assert got.events[-1].data == {"finish_reason": "stop"}
    assert got.events[-2].data["completion_tokens"] == 5
    assert all(e.data for e in got.events if e.kind == "delta")  # no empty delta sent
    assert b"event: error" not in got.raw
    # The gateway asked for usage; the upstream got a streaming request.
    assert upstream.state.last_body is not None
    assert upstream.state.last_body["stream"] is True
    assert upstream.state.last_body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("query", [False, True], ids=["header", "query"])
async def test_last_event_id_replays_after_n_then_follows_live_without_gap(
    http: aiohttp.ClientSession,
    gateway_factory: GatewayFactory,
    slow_upstream: Upstream,
    query: bool,
) -> None:
    gw = await gateway_factory(slow_upstream.url)
    url = await start_stream(http, gw)
    first = await read_stream(http, gw, url, stop_after=4)
    assert [e.id for e in first.events] == [1, 2, 3, 4]
    rest = await read_stream(http, gw, url, last=4, query=query)
    assert [e.id for e in rest.events] == list(range(5, 5 + len(rest.events)))
    assert rest.events[-1].kind == "done"
    assert text_of(first.events + rest.events) == "".join(reply_pieces(PROMPT, 30, 1))


async def test_reconnect_after_the_final_event_gets_204(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    url = await start_stream(http, gateway)
    got = await read_stream(http, gateway, url)
    again = await read_stream(http, gateway, url, last=got.events[-1].id)
    assert again.status == 204


@pytest.mark.parametrize("last", ["abc", "-1", "1.5"])
async def test_malformed_last_event_id_is_400(
    http: aiohttp.ClientSession, gateway: Gateway, last: str
) -> None:
    url = await start_stream(http, gateway)
    async with http.get(gateway.url + url, headers={"Last-Event-ID": last}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_unknown_stream_is_404_openai_json(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    for method in ("GET", "DELETE"):
        async with http.request(method, f"{gateway.url}/v1/streams/nope") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "stream_not_found"


async def test_max_connection_age_closes_and_resuming_loses_nothing(
    http: aiohttp.ClientSession, gateway_factory: GatewayFactory, slow_upstream: Upstream
) -> None:
    gw = await gateway_factory(slow_upstream.url, sse={"max_connection_age": 1, "retry_ms": 50})
    url = await start_stream(http, gw)
    events: list[Event] = []
    connections = 0
    while not events or events[-1].kind != "done":
        got = await read_stream(http, gw, url, last=events[-1].id if events else None)
        assert got.status == 200 and got.retry == 50
        connections += 1
        events += got.events
    assert connections >= 2
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert text_of(events) == "".join(reply_pieces(PROMPT, 30, 1))


async def test_heartbeat_while_idle(
    http: aiohttp.ClientSession, gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory(upstream.url, sse={"heartbeat_interval": 0.1})
    url = await start_stream(http, gw, headers={"x-mock-first-byte-delay": "0.6"})
    got = await read_stream(http, gw, url)
    assert got.pings >= 2
    assert got.events[-1].kind == "done"


async def test_delete_stops_the_upstream_and_ends_with_done_cancelled(
    http: aiohttp.ClientSession, gateway_factory: GatewayFactory, slow_upstream: Upstream
) -> None:
    gw = await gateway_factory(slow_upstream.url)
    url = await start_stream(http, gw)
    await read_stream(http, gw, url, stop_after=3)
    async with http.delete(gw.url + url) as r:
        assert r.status == 204
    await asyncio.wait_for(slow_upstream.state.client_disconnected.wait(), 5)
    assert slow_upstream.state.completed_streams == 0
    got = await read_stream(http, gw, url)
    assert got.events[-1].kind == "done"
    assert got.events[-1].data == {"finish_reason": "cancelled"}
    async with http.delete(gw.url + url) as r:  # stopping a stopped stream: still fine
        assert r.status == 204


async def test_100_concurrent_readers_get_identical_events(
    http: aiohttp.ClientSession, gateway_factory: GatewayFactory, start_upstream: StartUpstream
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=20, delay=0.05)))
    gw = await gateway_factory(up.url)
    url = await start_stream(http, gw)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as many:
        reads = await asyncio.gather(*(read_stream(many, gw, url) for _ in range(100)))
    first = reads[0].events
    assert first[-1].kind == "done" and len(first) == 23  # role + 20 content + usage + done
    assert all(r.events == first for r in reads)
    assert up.state.requests["/v1/chat/completions"] == 1  # one generation for all


async def test_a_late_reader_gets_the_whole_history(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    url = await start_stream(http, gateway)
    first = await read_stream(http, gateway, url)
    late = await read_stream(http, gateway, url)
    assert late.events == first.events and late.events[0].id == 1


async def test_a_reader_gone_mid_write_is_a_disconnect_not_a_traceback(
    http: aiohttp.ClientSession,
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A reader that sends its GET and resets the connection at once: the handler finds the
    # transport closing on a write (ClientConnectionResetError), not through a cancellation.
    # That is a normal disconnect: counted as one, and no "Error handling request" traceback
    # from aiohttp in the logs.
    up = await start_upstream(create_mock_app(MockSettings(chunks=50, delay=0.0)))
    gw = await gateway_factory(up.url)
    url = await start_stream(http, gw)
    assert (await read_stream(http, gw, url)).events[-1].kind == "done"
    caplog.set_level(logging.DEBUG)
    loop = asyncio.get_running_loop()
    readers = 10
    for _ in range(readers):
        with socket.socket() as s:
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", gw.port))
            await loop.sock_sendall(s, f"GET {url} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await _until(lambda: gw.app[FOLLOWERS].count == 0)
    for _ in range(200):  # each reader's exchange is counted once its handler has ended
        m = await scrape(http, gw)
        if value(m, "gateway_client_disconnects_total") >= readers:
            break
        await asyncio.sleep(0.02)
    assert value(m, "gateway_client_disconnects_total") >= 1  # handlers ran and saw it
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert not tracebacks, [f"{r.name}: {r.getMessage()}" for r in tracebacks]


async def test_the_generation_goes_on_with_no_reader(
    http: aiohttp.ClientSession, gateway_factory: GatewayFactory, start_upstream: StartUpstream
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=10, delay=0.02)))
    gw = await gateway_factory(up.url)
    url = await start_stream(http, gw)
    await _until(lambda: len(gw.app[STREAM_TASKS]) == 0)
    assert up.state.completed_streams == 1
    got = await read_stream(http, gw, url)
    assert text_of(got.events) == "".join(reply_pieces(PROMPT, 10, 1))


async def test_memory_is_freed_after_resume_ttl(
    http: aiohttp.ClientSession, gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory(upstream.url, sse={"resume_ttl": 0.3})
    url = await start_stream(http, gw)
    got = await read_stream(http, gw, url)
    assert got.events[-1].kind == "done"
    store = gw.app[EVENT_LOG]
    assert isinstance(store, MemoryEventLog)
    await _until(lambda: len(store) == 0)
    assert (await read_stream(http, gw, url)).status == 404


async def test_a_stream_over_the_log_bound_ends_with_fail(
    http: aiohttp.ClientSession, gateway_factory: GatewayFactory, slow_upstream: Upstream
) -> None:
    gw = await gateway_factory(slow_upstream.url, sse={"max_log_events": 5})
    url = await start_stream(http, gw)
    got = await read_stream(http, gw, url)
    assert len(got.events) == 5
    assert got.events[-1].kind == "fail"
    assert got.events[-1].data["error"]["code"] == "stream_too_long"
    await asyncio.wait_for(slow_upstream.state.client_disconnected.wait(), 5)


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"x-mock-status": "400"}, "mock_fault"),
        ({"x-mock-fail-after": "3"}, "upstream_disconnected"),
    ],
    ids=["upstream-4xx", "upstream-cut"],
)
async def test_upstream_failure_ends_the_stream_with_fail(
    http: aiohttp.ClientSession, gateway: Gateway, headers: dict[str, str], code: str
) -> None:
    url = await start_stream(http, gateway, headers=headers)
    got = await read_stream(http, gateway, url)
    assert got.events[-1].kind == "fail"
    assert got.events[-1].data["error"]["code"] == code
    assert b"event: error" not in got.raw


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "mock-gpt"}, 400),
        ({"model": "mock-gpt", "messages": [{"role": "robot"}]}, 400),
        ({"messages": [{"role": "user", "content": "x"}]}, 400),
    ],
)
async def test_bad_requests_are_refused_before_a_stream_starts(
    http: aiohttp.ClientSession, gateway: Gateway, body: dict[str, Any], status: int
) -> None:
    async with http.post(f"{gateway.url}/v1/streams", json=body) as r:
        assert r.status == status
        assert (await r.json())["error"]["type"] == "invalid_request_error"
    assert len(gateway.app[STREAM_TASKS]) == 0


# -------------------------------------------------------------- the seams with auth/throttle


class FakeSlot:
    def __init__(self) -> None:
        self.detached = False
        self.released = asyncio.Event()

    def detach(self) -> None:
        self.detached = True

    async def release(self) -> None:
        self.released.set()


class FakeUsage:
    def __init__(self) -> None:
        self.records: list[tuple[str, Usage | None, bool]] = []

    async def record(self, client: str, usage: Usage | None, *, streamed: bool) -> None:
        self.records.append((client, usage, streamed))


@pytest.fixture
async def seamed(
    slow_upstream: Upstream,
) -> AsyncIterator[tuple[Gateway, list[FakeSlot], FakeUsage]]:
    """A gateway whose requests carry an identity and a slot, as auth and throttle set them."""
    slots: list[FakeSlot] = []

    @web.middleware
    async def seams(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request[IDENTITY] = Identity(client="alice", models=("mock-*",))
        slots.append(FakeSlot())
        request[SLOT] = slots[-1]
        return await handler(request)

    cfg = make_config(slow_upstream.url)
    app = create_app(cfg)
    app.middlewares.append(seams)
    usage = FakeUsage()

    async def fake_usage(app: web.Application) -> None:
        app[USAGE] = usage  # after gateway.backends installed the real store

    app.on_startup.append(fake_usage)
    runner, port = await start(app, "127.0.0.1", 0, shutdown_timeout=2)
    yield Gateway(app, runner, port, cfg), slots, usage
    await runner.cleanup()


async def test_the_generation_holds_its_slot_until_it_ends_and_records_usage(
    http: aiohttp.ClientSession, seamed: tuple[Gateway, list[FakeSlot], FakeUsage]
) -> None:
    gw, slots, usage = seamed
    url = await start_stream(http, gw)
    assert slots[0].detached and not slots[0].released.is_set()
    await asyncio.wait_for(slots[0].released.wait(), 10)
    got = await read_stream(http, gw, url)
    assert got.events[-1].kind == "done"
    assert usage.records == [("alice", Usage(2, 30, 32), True)]


async def test_a_model_the_client_may_not_use_is_403(
    http: aiohttp.ClientSession, seamed: tuple[Gateway, list[FakeSlot], FakeUsage]
) -> None:
    gw, slots, _ = seamed
    async with http.post(f"{gw.url}/v1/streams", json=chat_body(model="gpt-4o")) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "model_not_allowed"
    assert not slots[0].detached


async def test_shutdown_ends_a_running_generation_with_fail(
    http: aiohttp.ClientSession, seamed: tuple[Gateway, list[FakeSlot], FakeUsage],
    slow_upstream: Upstream,
) -> None:
    gw, slots, _ = seamed
    url = await start_stream(http, gw)
    await read_stream(http, gw, url, stop_after=2)
    store = gw.app[EVENT_LOG]
    ends: list[str] = []
    real_append = store.append

    async def append(stream_id: str, kind: str, data: str) -> int | None:
        ends.append(kind)
        return await real_append(stream_id, kind, data)

    store.append = append  # type: ignore[method-assign]
    await gw.runner.cleanup()  # grace 2 s < the 3 s stream
    assert ends[-1] == "fail"
    assert slots[0].released.is_set()
    await asyncio.wait_for(slow_upstream.state.client_disconnected.wait(), 5)


async def _until(cond: Callable[[], bool], timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_with_auth_and_throttle_a_generation_counts_toward_max_concurrent(
    http: aiohttp.ClientSession, gateway_factory: GatewayFactory, slow_upstream: Upstream
) -> None:
    keys = [{"client": "tester", "sha256": TEST_KEY_SHA, "max_concurrent": 1, "rpm": 0}]
    gw = await gateway_factory(slow_upstream.url, auth={"mode": "keys"}, keys=keys)
    auth = {"Authorization": f"Bearer {TEST_KEY}"}
    async with http.post(f"{gw.url}/v1/streams", json=chat_body()) as r:
        assert r.status == 401  # POST needs credentials
    url = await start_stream(http, gw, headers=auth)
    async with http.post(f"{gw.url}/v1/streams", json=chat_body(), headers=auth) as r:
        assert r.status == 429  # the first generation holds the only slot
        assert int(r.headers["Retry-After"]) >= 1
    got = await read_stream(http, gw, url)  # GET needs no credentials: the id is enough
    assert got.events[-1].kind == "done"
    await _until(lambda: len(gw.app[STREAM_TASKS]) == 0)
    url2 = await start_stream(http, gw, headers=auth)  # the slot came back
    async with http.delete(gw.url + url2) as r:
        assert r.status == 204
