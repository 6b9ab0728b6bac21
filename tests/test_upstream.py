"""UpstreamPool as a client, unit-tested: connect errors and status codes via aioresponses."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aioresponses import aioresponses
from multidict import CIMultiDict

from gateway.errors import Unavailable, UpstreamError, UpstreamTimeout
from gateway.exchange import Exchange
from gateway.upstream.breaker import State
from gateway.upstream.pool import UpstreamPool, retry_after_seconds

from .conftest import StartUpstream, make_config
from .faulty import Faulty, Step

URL = re.compile(r"^http://up\.test/v1/chat/completions$")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def pool(session: aiohttp.ClientSession, **sections: Any) -> UpstreamPool:
    sections.setdefault("retry", {"attempts": 3, "backoff_initial": 0.0, "backoff_max": 0.0})
    return UpstreamPool(make_config("http://up.test/v1", **sections), session)


def exchange() -> Exchange:
    return Exchange("rid", "a" * 32, "b" * 16, "01", 0.0, model="mock-gpt")


async def open_(p: UpstreamPool, ex: Exchange) -> aiohttp.ClientResponse:
    _, resp = await p.open("POST", "/chat/completions", ex=ex, body=b"{}", headers=CIMultiDict())
    return resp


async def test_connect_errors_are_retried_then_raised_as_502(
    session: aiohttp.ClientSession,
) -> None:
    p = pool(session, breaker={"failure_threshold": 10})
    ex = exchange()
    with aioresponses() as m:
        m.post(URL, exception=aiohttp.ClientConnectionError("refused"), repeat=True)
        with pytest.raises(UpstreamError):
            await open_(p, ex)
    assert ex.attempts == 3
    assert p.upstreams[0].breaker.failures == 3


async def test_timeouts_are_retried_then_raised_as_504(session: aiohttp.ClientSession) -> None:
    p = pool(session)
    ex = exchange()
    with aioresponses() as m:
        m.post(URL, exception=TimeoutError(), repeat=True)
        with pytest.raises(UpstreamTimeout):
            await open_(p, ex)
    assert ex.attempts == 3


# aioresponses 0.7.9 cannot build a ClientResponse on aiohttp 3.14 (`stream_writer`), so the
# status-code cases run against the scripted upstream on a real port instead.


async def real_pool(
    session: aiohttp.ClientSession, start_upstream: StartUpstream, faulty: Faulty, **sections: Any
) -> UpstreamPool:
    up = await start_upstream(faulty.app())
    sections.setdefault("retry", {"attempts": 3, "backoff_initial": 0.0, "backoff_max": 0.0})
    return UpstreamPool(make_config(up.url, **sections), session)


async def test_a_5xx_then_200_returns_the_200(
    session: aiohttp.ClientSession, start_upstream: StartUpstream
) -> None:
    p = await real_pool(session, start_upstream, Faulty([Step(500)]))
    ex = exchange()
    resp = await open_(p, ex)
    resp.release()
    assert resp.status == 200 and ex.attempts == 2
    assert p.upstreams[0].breaker.failures == 0  # the success reset the count


async def test_a_4xx_is_returned_at_once_and_is_no_breaker_failure(
    session: aiohttp.ClientSession, start_upstream: StartUpstream
) -> None:
    p = await real_pool(
        session, start_upstream, Faulty([Step(404)]), breaker={"failure_threshold": 1}
    )
    ex = exchange()
    resp = await open_(p, ex)
    resp.release()
    assert resp.status == 404 and ex.attempts == 1
    assert p.upstreams[0].breaker.state is State.CLOSED


async def test_threshold_failures_open_the_breaker_and_then_nothing_is_sent(
    session: aiohttp.ClientSession, start_upstream: StartUpstream
) -> None:
    faulty = Faulty([Step(503)] * 2)
    p = await real_pool(
        session,
        start_upstream,
        faulty,
        retry={"attempts": 1},
        breaker={"failure_threshold": 2, "cooldown": 60.0},
    )
    for _ in range(2):
        resp = await open_(p, exchange())
        resp.release()
        assert resp.status == 503
    with pytest.raises(Unavailable):
        await open_(p, exchange())
    assert faulty.requests == 2


async def test_connection_slot_is_returned_when_the_response_ends(
    session: aiohttp.ClientSession, start_upstream: StartUpstream
) -> None:
    p = await real_pool(session, start_upstream, Faulty(), upstreams=[{"max_connections": 1}])
    for _ in range(3):  # with a leaked slot the second open would wait forever
        resp = await asyncio.wait_for(open_(p, exchange()), 5)
        await resp.read()
    assert not p.upstreams[0].slots.locked()


async def test_connection_slot_is_held_while_the_body_streams_and_freed_on_close(
    session: aiohttp.ClientSession, start_upstream: StartUpstream
) -> None:
    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: {}\n\n")
        await asyncio.Event().wait()
        return resp

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/v1/chat/completions", stalls)
    up = await start_upstream(app)
    p = UpstreamPool(make_config(up.url, upstreams=[{"max_connections": 1}]), session)
    resp = await open_(p, exchange())
    assert p.upstreams[0].slots.locked()  # the one connection is busy streaming
    resp.close()
    assert not p.upstreams[0].slots.locked()


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("-1") == 0.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    got = retry_after_seconds(later)
    assert got is not None and 25 < got <= 30


async def test_backoff_is_full_jitter_under_an_exponential_cap(
    session: aiohttp.ClientSession,
) -> None:
    p = pool(session, retry={"attempts": 5, "backoff_initial": 0.1, "backoff_max": 0.5})
    for retry, cap in ((0, 0.1), (1, 0.2), (2, 0.4), (3, 0.5), (8, 0.5)):
        draws = [p._backoff(retry) for _ in range(300)]
        assert all(0 <= d <= cap for d in draws)
        assert max(draws) > cap * 0.8 and min(draws) < cap * 0.2  # spread over the range


async def test_the_watchdog_never_replaces_an_error_the_body_already_has(
    start_upstream: StartUpstream,
) -> None:
    """An upstream that drops its connection mid-body leaves the read an error of its own
    (upstream_disconnected); the watchdog, firing later, must not turn it into a timeout."""
    from aiohttp import web

    from gateway.ticker import Ticker
    from gateway.upstream.pool import Watchdog

    async def drop(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: {}\n\n")
        assert request.transport is not None
        request.transport.close()  # mid-body: the chunked body never ends
        return resp

    app = web.Application()
    app.router.add_get("/drop", drop)
    up = await start_upstream(app)
    loop = asyncio.get_running_loop()
    url = up.url.removesuffix("/v1") + "/drop"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        dog = Watchdog(resp, 0.05, loop.time() + 30, Ticker(0.01), lambda: None, loop.time())
        assert await resp.content.readexactly(10) == b"data: {}\n\n"  # nothing left unread
        for _ in range(300):  # until the connection's loss is known to the body
            if resp.content.exception() is not None:
                break
            await asyncio.sleep(0.01)
        for _ in range(300):  # and the watchdog has seen more than its idle limit pass
            if dog.stopped:
                break
            await asyncio.sleep(0.01)
        assert dog.stopped
        with pytest.raises(aiohttp.ClientPayloadError):
            while await resp.content.readany():
                pass
        dog.release()
