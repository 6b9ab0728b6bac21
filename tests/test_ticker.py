"""The one timer for every open stream's checks (`gateway.ticker`)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from structlog.testing import capture_logs

from gateway.ticker import TICKER, Ticker, tick_period

from .conftest import GatewayFactory, StartUpstream, chat_body, make_config


class Member:
    def __init__(self, fail: bool = False) -> None:
        self.ticks: list[float] = []
        self.ticked = asyncio.Event()
        self.fail = fail

    def tick(self, now: float) -> None:
        self.ticks.append(now)
        self.ticked.set()
        if self.fail:
            raise RuntimeError("boom")


def test_the_period_is_at_most_a_second_and_a_fraction_of_the_shortest_interval() -> None:
    assert tick_period(make_config("http://up.test/v1")) == 1.0
    cfg = make_config("http://up.test/v1", sse={"heartbeat_interval": 0.2})
    assert tick_period(cfg) == 0.05
    cfg = make_config("http://up.test/v1", upstreams=[{"idle_timeout": 0.4}])
    assert tick_period(cfg) == 0.05


async def test_each_member_is_ticked_until_it_leaves_and_a_new_one_rearms_it() -> None:
    ticker = Ticker(0.01)
    a, b = Member(), Member()
    ticker.add(a)
    ticker.add(b)
    await asyncio.wait_for(asyncio.gather(a.ticked.wait(), b.ticked.wait()), 5)
    ticker.discard(a)
    ticker.discard(b)
    seen = len(a.ticks)
    c = Member()
    await asyncio.sleep(0.05)  # ticks that would come, were anything still watched
    assert len(a.ticks) == seen  # a member that left is never ticked again
    ticker.add(c)  # the ticker stopped while empty: adding one starts it again
    await asyncio.wait_for(c.ticked.wait(), 5)
    ticker.discard(c)
    assert len(ticker) == 0


async def test_a_member_that_raises_leaves_and_the_others_are_still_ticked() -> None:
    ticker = Ticker(0.01)
    bad, good = Member(fail=True), Member()
    with capture_logs() as logs:
        ticker.add(bad)
        ticker.add(good)
        await asyncio.wait_for(bad.ticked.wait(), 5)
        good.ticked.clear()
        await asyncio.wait_for(good.ticked.wait(), 5)  # a tick after the failure
    assert len(bad.ticks) == 1 and len(ticker) == 1
    assert [e["event"] for e in logs] == ["tick_failed"]
    ticker.discard(good)


async def test_open_streams_are_watched_on_the_ticker_and_leave_it_when_they_end(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    """Each open stream's heartbeat and upstream watchdog are members of the app's one
    ticker (no timer of their own); a stream that ends, or whose client leaves, leaves it."""
    release = asyncio.Event()
    started = 0
    all_started = asyncio.Event()

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        nonlocal started
        await request.read()
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n')
        started += 1
        if started == 10:
            all_started.set()
        await release.wait()
        await out.write(b"data: [DONE]\n\n")
        return out

    app = web.Application()
    app.router.add_post("/v1/chat/completions", slow_stream)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url)
    ticker = gw.app[TICKER]
    url = f"{gw.url}/v1/chat/completions"
    streams = [await http.post(url, json=chat_body(stream=True)) for _ in range(10)]
    await asyncio.wait_for(all_started.wait(), 30)
    assert all(s.status == 200 for s in streams)
    assert len(ticker) == 20  # a heartbeat and a watchdog each
    streams.pop().close()  # one client leaves mid-stream
    for _ in range(500):
        if len(ticker) == 18:
            break
        await asyncio.sleep(0.01)
    assert len(ticker) == 18
    release.set()
    for s in streams:
        assert (await s.read()).endswith(b"data: [DONE]\n\n")
        s.release()
    for _ in range(500):  # the last connection's release comes just after its body
        if len(ticker) == 0:
            break
        await asyncio.sleep(0.01)
    assert len(ticker) == 0
