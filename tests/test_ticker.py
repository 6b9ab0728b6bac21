"""The one timer for every open stream's checks (`gateway.ticker`)."""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway import ticker as ticker_module
from gateway.process.reload import reload
from gateway.ticker import TICKER, Ticker, tick_period

from .conftest import GatewayFactory, HeldStreams, StartUpstream, chat_body, make_config
from .test_relay_faults import stalling_upstream


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
    assert not ticker.armed  # and with none left, no timer either
    ticker.add(c)  # adding one starts it again
    await asyncio.wait_for(c.ticked.wait(), 5)
    ticker.discard(c)
    assert len(ticker) == 0


async def test_one_wake_up_visits_a_slice_of_the_members_and_each_once_a_period() -> None:
    """8,000 streams' checks take milliseconds: they are spread, never done all at once."""
    period = 0.8
    ticker = Ticker(period)
    members = [Member() for _ in range(4 * Ticker.SLICES)]
    for m in members:
        ticker.add(m)
    await asyncio.wait_for(asyncio.gather(*(m.ticked.wait() for m in members)), 5)
    for m in members:
        ticker.discard(m)
    firsts = sorted({m.ticks[0] for m in members})
    assert len(firsts) == Ticker.SLICES  # a slice per wake-up, not everyone at once
    assert firsts[-1] - firsts[0] == pytest.approx(period * (Ticker.SLICES - 1) / 8)


async def test_a_members_checks_are_a_period_apart_however_late_the_loop_runs_them() -> None:
    """The wake-ups keep to a grid: 8 chained timers, each run a little late (or, by uvloop,
    a little early), would stretch a period, and the idle limit with it."""
    period = 0.2
    ticker = Ticker(period)
    m = Member()
    ticker.add(m)
    while len(m.ticks) < 4:
        m.ticked.clear()
        await asyncio.wait_for(m.ticked.wait(), 5)
    ticker.discard(m)
    gaps = [b - a for a, b in itertools.pairwise(m.ticks)]
    assert gaps == pytest.approx([period] * 3, abs=1e-9)


async def test_long_lived_members_stay_spread_whatever_comes_and_goes() -> None:
    """Every stream brings two members; many short ones between the long ones must not herd
    the long ones into a few slices (whose wake-ups would each visit most of them)."""
    ticker = Ticker(0.4)
    kept = []
    for _ in range(Ticker.SLICES):
        kept.append(Member())
        ticker.add(kept[-1])
        passing = [Member() for _ in range(Ticker.SLICES - 1)]
        for m in passing:
            ticker.add(m)
        for m in passing:
            ticker.discard(m)
    await asyncio.wait_for(asyncio.gather(*(m.ticked.wait() for m in kept)), 5)
    for m in kept:
        ticker.discard(m)
    assert len({m.ticks[0] for m in kept}) == Ticker.SLICES


async def test_a_reload_that_shortens_the_period_applies_it_at_once() -> None:
    ticker = Ticker(8.0)  # a wake-up a second
    members = [Member() for _ in range(Ticker.SLICES)]  # one in each slice
    for m in members:
        ticker.add(m)
    first = members[0]
    await asyncio.wait_for(first.ticked.wait(), 5)
    first.ticked.clear()
    ticker.prepare_reload(make_config("http://up.test/v1", upstreams=[{"idle_timeout": 0.8}]))()
    assert ticker.period == 0.1
    start = time.monotonic()
    await asyncio.wait_for(first.ticked.wait(), 5)
    for m in members:
        ticker.discard(m)
    assert time.monotonic() - start < 0.5  # not the 1 s the old period had to the next


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


async def test_the_ticker_goes_on_when_its_own_error_path_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure that escapes a member's handling (the log write itself, on a full stdout)
    must not end every stream's checks for the life of the process."""

    def failing_log(*args: object, **kwargs: object) -> None:
        raise BlockingIOError("stdout full")

    monkeypatch.setattr(ticker_module.log, "exception", failing_log)
    loop = asyncio.get_running_loop()
    errors: list[BaseException | None] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context.get("exception")))
    try:
        ticker = Ticker(0.08)
        bad = Member(fail=True)
        ticker.add(bad)
        fillers = [Member() for _ in range(Ticker.SLICES - 1)]
        for m in fillers:
            ticker.add(m)
        good = Member()  # in the failing member's slice: every slice holds one already
        ticker.add(good)
        await asyncio.wait_for(bad.ticked.wait(), 5)
        await asyncio.wait_for(good.ticked.wait(), 5)
        good.ticked.clear()
        await asyncio.wait_for(good.ticked.wait(), 5)  # and it goes on
        for m in [good, *fillers]:
            ticker.discard(m)
    finally:
        loop.set_exception_handler(None)
    assert good.ticks[0] == bad.ticks[0]  # ticked by the very wake-up the failure was in
    assert errors == []  # the failure stayed inside the ticker


async def test_a_reload_never_loosens_the_checks_of_streams_already_running(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """A stream keeps the idle_timeout it started with (0.4 s): a reload to 120 s must not
    stretch how often it is checked."""
    app, _ = stalling_upstream(after_first=10.0)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url, upstreams=[{"idle_timeout": 0.4}])
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        await resp.content.readuntil(b"\n\n")
        start = time.monotonic()
        reload(gw.app, make_config(up.url, upstreams=[{"idle_timeout": 120.0}]))
        body = await resp.read()
        elapsed = time.monotonic() - start
    assert b"upstream_timeout" in body
    assert elapsed < 0.8, elapsed  # 0.45 s at most, bar a loaded machine; 1.05 s if loosened
    assert gw.app[TICKER].period == 0.05


async def test_a_reload_that_waits_for_a_restart_leaves_the_heartbeat_period_alone(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """[sse] takes a restart: a heartbeat_interval changed in the file is not in force, and
    must not change how often pings are checked either way."""
    app, _ = stalling_upstream(after_first=3.0)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url, sse={"heartbeat_interval": 0.2})
    for interval in (0.004, 30.0):  # the last one would loosen it, were it taken
        with capture_logs() as logs:
            reload(gw.app, make_config(up.url, sse={"heartbeat_interval": interval}))
        assert any(e["event"] == "reload_needs_restart" for e in logs)
        assert gw.app[TICKER].period == 0.05
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        await resp.content.readuntil(b"\n\n")  # the first event
        last = time.monotonic()
        gaps = []
        for _ in range(2):
            assert await resp.content.readuntil(b"\n\n") == b": ping\n\n"
            now = time.monotonic()
            gaps.append(now - last)
            last = now
    assert max(gaps) < 0.6, gaps  # 0.25 s at most, bar a loaded machine; 1 s if loosened


async def test_open_streams_are_watched_on_the_ticker_and_leave_it_when_they_end(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    """Each open stream's heartbeat and upstream watchdog are members of the app's one
    ticker (no timer of their own); a stream that ends, or whose client leaves, leaves it."""
    held = HeldStreams(count=10)
    up = await start_upstream(held.app)
    gw = await gateway_factory(up.url)
    ticker = gw.app[TICKER]
    url = f"{gw.url}/v1/chat/completions"
    streams = [await http.post(url, json=chat_body(stream=True)) for _ in range(10)]
    await asyncio.wait_for(held.started.wait(), 30)
    assert all(s.status == 200 for s in streams)
    assert len(ticker) == 20  # a heartbeat and a watchdog each
    streams.pop().close()  # one client leaves mid-stream
    for _ in range(500):
        if len(ticker) == 18:
            break
        await asyncio.sleep(0.01)
    assert len(ticker) == 18
    held.release.set()
    for s in streams:
        assert (await s.read()).endswith(b"data: [DONE]\n\n")
        s.release()
    for _ in range(500):  # the last connection's release comes just after its body
        if len(ticker) == 0:
            break
        await asyncio.sleep(0.01)
    assert len(ticker) == 0
