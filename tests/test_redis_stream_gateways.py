"""Detached streams on several gateway instances sharing one real Redis, over real sockets:
started on one, read and resumed on the others with no gap or duplicate; stopped from
another; a dead owner's readers get `fail`; Redis down refuses new streams with 503."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from gateway.mock_upstream import MockSettings, create_mock_app, reply_pieces
from gateway.sse import EventSplitter, iter_events, parse_event
from tests.conftest import Gateway, GatewayFactory, StartUpstream, Upstream, chat_body
from tests.killable import ServeProcess, config_text
from tests.redis_server import RedisServer, redis_limits

PROMPT = "hello there"


@dataclass
class Event:
    id: int
    kind: str
    data: Any


@dataclass
class Read:
    status: int
    events: list[Event] = field(default_factory=list)
    raw: bytes = b""


async def start_stream(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(f"{url}/v1/streams", json=chat_body()) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["url"])


async def read_stream(
    http: aiohttp.ClientSession, base: str, path: str, *, last: int = 0,
    stop_after: int | None = None,
) -> Read:
    """GET the stream (resuming after `last`) to its end or `stop_after` events."""
    headers = {"Last-Event-ID": str(last)} if last else {}
    async with http.get(base + path, headers=headers) as r:
        out = Read(r.status)
        if r.status != 200:
            out.raw = await r.read()
            return out
        splitter = EventSplitter()
        async for chunk in r.content.iter_any():
            out.raw += chunk
            for raw in iter_events(splitter.feed(chunk)):
                ev = parse_event(raw)
                if ev is None or ev.data is None:
                    continue
                assert ev.id is not None and ev.event is not None
                out.events.append(Event(int(ev.id), ev.event, orjson.loads(ev.data)))
                if stop_after is not None and len(out.events) >= stop_after:
                    return out
    return out


def text_of(events: list[Event]) -> str:
    return "".join(e.data.get("content", "") for e in events if e.kind == "delta")


@pytest.fixture
async def slow_upstream(start_upstream: StartUpstream) -> Upstream:
    """20 chunks 0.05 s apart: a one-second stream."""
    return await start_upstream(create_mock_app(MockSettings(chunks=20, delay=0.05)))


async def two(
    gateway_factory: GatewayFactory, upstream: Upstream, redis_url: str, **limits: Any
) -> tuple[Gateway, Gateway]:
    sections = {"limits": redis_limits(redis_url, **limits)}
    return (
        await gateway_factory(upstream.url, **sections),
        await gateway_factory(upstream.url, **sections),
    )


async def test_a_stream_started_on_a_is_resumed_on_b_and_a_without_gap_or_duplicate(
    gateway_factory: GatewayFactory, slow_upstream: Upstream, redis_url: str,
    http: aiohttp.ClientSession,
) -> None:
    a, b = await two(gateway_factory, slow_upstream, redis_url)
    path = await start_stream(http, a.url)
    first = await read_stream(http, b.url, path, stop_after=4)  # on B, while it runs on A
    second = await read_stream(http, a.url, path, last=first.events[-1].id, stop_after=5)
    rest = await read_stream(http, b.url, path, last=second.events[-1].id)
    events = first.events + second.events + rest.events
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert text_of(events) == "".join(reply_pieces(PROMPT, 20, 1))
    assert [e.kind for e in events][-2:] == ["usage", "done"]
    assert events[-1].data == {"finish_reason": "stop"}
    again = await read_stream(http, b.url, path, last=events[-1].id)
    assert again.status == 204  # EventSource stops: the stream is over, on any instance
    assert slow_upstream.state.requests["/v1/chat/completions"] == 1  # generated once


async def test_delete_on_b_stops_the_generation_running_on_a(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, redis_url: str,
    http: aiohttp.ClientSession,
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=200, delay=0.05)))
    a, b = await two(gateway_factory, up, redis_url, lease_ttl=30)  # no help from polling
    path = await start_stream(http, a.url)
    await read_stream(http, b.url, path, stop_after=2)
    async with http.delete(b.url + path) as r:
        assert r.status == 204
    await asyncio.wait_for(up.state.client_disconnected.wait(), 3)  # A closed its upstream
    assert up.state.completed_streams == 0
    got = await read_stream(http, a.url, path)
    assert got.events[-1].kind == "done"
    assert got.events[-1].data == {"finish_reason": "cancelled"}
    async with http.delete(a.url + "/v1/streams/unknown-id") as r:
        assert r.status == 404


async def test_readers_get_fail_when_the_owning_instance_is_killed(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, redis_url: str,
    http: aiohttp.ClientSession, serve_process: ServeProcess,
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=400, delay=0.05)))
    lease = 1.5
    sections: dict[str, Any] = {
        "auth": {"mode": "none"},
        "limits": redis_limits(redis_url, lease_ttl=lease),
    }
    proc = await serve_process(config_text(up.url, **sections))
    owner_url = proc.url
    reader = await gateway_factory(up.url, **sections)
    path = await start_stream(http, owner_url)
    reading = asyncio.create_task(read_stream(http, reader.url, path))
    await asyncio.sleep(lease)  # events flow, renewals happen
    proc.send(signal.SIGKILL)
    await proc.wait_exit()
    killed = time.monotonic()
    got = await asyncio.wait_for(reading, lease + 10)
    assert time.monotonic() - killed <= lease + 2.0  # about one lease, not forever
    assert [e.id for e in got.events] == list(range(1, len(got.events) + 1))
    assert got.events[-1].kind == "fail"
    assert got.events[-1].data["error"]["code"] == "stream_owner_lost"
    assert b"event: error" not in got.raw
    again = await read_stream(http, reader.url, path, last=got.events[-1].id)
    assert again.status == 204


async def test_redis_down_refuses_new_streams_with_503_and_they_work_again_after(
    gateway_factory: GatewayFactory, upstream: Upstream, redis_server: RedisServer,
    redis_url: str, http: aiohttp.ClientSession,
) -> None:
    a, b = await two(gateway_factory, upstream, redis_url)
    redis_server.stop()
    async with http.post(f"{a.url}/v1/streams", json=chat_body()) as r:
        assert r.status == 503
        body = await r.json()
        assert body["error"]["type"] == "service_unavailable"
        assert body["error"]["code"] == "redis_unavailable"
    redis_server.start()  # restarted, empty: no gateway restart needed
    deadline = time.monotonic() + 10
    for gw in (a, b):
        while True:  # ready again once its monitor has seen Redis back (within a second)
            async with http.get(f"{gw.url}/readyz") as r:
                if r.status == 200:
                    break
            assert time.monotonic() < deadline, "never ready again"
            await asyncio.sleep(0.05)
    path = await start_stream(http, a.url)
    got = await read_stream(http, b.url, path)
    assert got.status == 200 and got.events[-1].kind == "done"


async def test_a_stream_running_through_a_redis_restart_ends_and_its_reader_is_told(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, redis_server: RedisServer,
    redis_url: str, http: aiohttp.ClientSession,
) -> None:
    """Redis lost the stream: the owner stops generating (nobody could read what follows)
    and a reader's reconnect gets 404 rather than waiting for events that never come."""
    up = await start_upstream(create_mock_app(MockSettings(chunks=400, delay=0.05)))
    a, b = await two(gateway_factory, up, redis_url)
    path = await start_stream(http, a.url)
    first = await read_stream(http, b.url, path, stop_after=2)
    with capture_logs():
        redis_server.restart()
        await asyncio.wait_for(up.state.client_disconnected.wait(), 10)
    again = await read_stream(http, b.url, path, last=first.events[-1].id)
    assert again.status == 404


async def test_a_finished_generation_is_logged_completed_when_its_end_is_heard_first(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    redis_url: str,
    http: aiohttp.ClientSession,
) -> None:
    """The owner's final append publishes the end; the instance can learn of it (pub/sub,
    renewal) before the append's reply. Forced here: the reply is held until the renewal
    has seen the ended log and the loop has turned a few times."""
    from gateway.streams.log import EVENT_LOG, FINAL_KINDS
    from gateway.streams.redis import RedisEventLog

    gw = await gateway_factory(upstream.url, limits=redis_limits(redis_url))
    events = gw.app[EVENT_LOG]
    assert isinstance(events, RedisEventLog)
    real = events._append

    async def end_heard_before_the_reply(*, keys: list[str], args: list[Any]) -> Any:
        n = await real(keys=keys, args=args)
        if args[0] in FINAL_KINDS:
            await events.renew()  # sees the log ended, as the pub/sub listener would
            for _ in range(10):
                await asyncio.sleep(0)  # the generation's watcher may act on it now
        return n

    events._append = end_heard_before_the_reply  # type: ignore[assignment]
    with capture_logs() as seen:
        path = await start_stream(http, gw.url)
        got = await read_stream(http, gw.url, path)
        async with asyncio.timeout(10):
            while not [e for e in seen if e["event"] == "stream_ended"]:
                await asyncio.sleep(0.01)  # written by the generation's own task
    assert got.events[-1].kind == "done"
    assert got.events[-1].data == {"finish_reason": "stop"}
    [ended] = [e for e in seen if e["event"] == "stream_ended"]
    assert ended["stream_outcome"] == "completed"


async def test_followers_past_the_cap_are_refused_503_and_hold_no_redis_connection(
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    redis_url: str,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    import redis.asyncio as aioredis

    up = await start_upstream(create_mock_app(MockSettings(chunks=400, delay=0.05)))
    gw = await gateway_factory(up.url, limits=redis_limits(redis_url), sse={"max_followers": 3})
    path = await start_stream(http, gw.url)
    admin = aioredis.Redis.from_url(redis_url)

    async def clients() -> int:
        return int((await admin.info("clients"))["connected_clients"])

    before = await clients()
    readers: list[aiohttp.ClientResponse] = []
    refused: list[tuple[int, dict[str, Any], str | None]] = []
    async with aiohttp.ClientSession() as browsers:
        for _ in range(10):  # one id, ten readers: what an attacker holding it could open
            r = await browsers.get(gw.url + path)
            if r.status == 200:
                await r.content.readuntil(b"\n\n")  # retry: the reader is following
                readers.append(r)
            else:
                refused.append((r.status, await r.json(), r.headers.get("Retry-After")))
                r.release()
        assert len(readers) == 3
        assert len(refused) == 7
        for status, body, retry_after in refused:
            assert status == 503
            assert body["error"]["code"] == "too_many_followers"
            assert body["error"]["type"] == "service_unavailable"
            assert retry_after == "1"
        # Three followers waiting in XREAD BLOCK: three blocking connections, not ten.
        assert await clients() - before <= 3 + 2
        readers.pop().close()  # a reader leaves: its place is free again
        async with asyncio.timeout(10):
            while True:
                async with browsers.get(gw.url + path) as r:
                    if r.status == 200:
                        break
                    assert r.status == 503
                await asyncio.sleep(0.02)  # the server notices the closed reader on its own
        for r in readers:
            r.close()
    await admin.aclose()
    async with http.delete(gw.url + path) as r:
        assert r.status == 204


async def test_redis_down_refuses_a_background_response_before_anything_goes_upstream(
    gateway_factory: GatewayFactory, upstream: Upstream, redis_server: RedisServer,
    redis_url: str, http: aiohttp.ClientSession,
) -> None:
    """A 503 after the upstream started would be passed to another instance by nginx (and
    the generation started there again): the log is made first, so nothing went upstream."""
    a, _ = await two(gateway_factory, upstream, redis_url)
    redis_server.stop()
    body = {"model": "mock-gpt", "input": "hi", "background": True}
    async with http.post(f"{a.url}/v1/responses", json=body) as r:
        assert r.status == 503
        assert (await r.json())["error"]["code"] == "redis_unavailable"
    assert upstream.state.requests["/v1/responses"] == 0
    redis_server.start()
