"""One timer for every open stream's periodic checks.

A stream is checked now and then, never per chunk: its heartbeat (`: ping` after a silence),
its write deadline (a client that takes no byte) and its upstream watchdog (idle and total
limits). On a loop timer each, every stream held two or three timers (with uvloop a libuv
timer each, about 0.8 KiB) and armed and cancelled them once per stream. Like nginx's one
timer tree for all its connections, the app keeps one `Ticker` (`TICKER`): while anything is
watched, it calls each member's `tick(now)` once every `period` seconds (an eighth of the
members at a time). A member decides on its own clock whether anything is due, so a check
is late by at most `period` (`tick_period`: at most 1 s, and a fraction of the shortest
interval the config sets).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

import structlog
from aiohttp import web

from .config import Config

log = structlog.get_logger("gateway.ticker")


class Ticking(Protocol):
    def tick(self, now: float) -> None: ...


def tick_period(cfg: Config) -> float:
    """At most 1 s, a quarter of the heartbeat interval, an eighth of any upstream's idle or
    total timeout: a heartbeat is then late by at most a quarter of its interval, an idle
    stream ends within `idle_timeout` x 1.125."""
    return min(1.0, cfg.sse.heartbeat_interval / 4, *_upstream_limits(cfg))


def _upstream_limits(cfg: Config) -> list[float]:
    return [min(u.idle_timeout, u.total_timeout) / 8 for u in cfg.upstreams]


# How much earlier than due a member may act: a loop runs a timer up to a millisecond early
# (uvloop counts whole milliseconds), and a check that missed by that much would wait a
# whole period for the next.
EARLY = 0.001


class Ticker:
    """Calls `tick(now)` on each member once every `period` seconds; no timer while it has
    none. A member that raises is logged and leaves; the others are still checked.

    The members are spread over `SLICES` sets, one ticked every `period / SLICES`: with
    thousands of streams open no single wake-up visits them all (8,000 streams' heartbeats
    and watchdogs take about 8 ms to check, which would stall every stream at once). The
    wake-ups keep to a grid of absolute times, and `now` is the grid's: a member's checks
    are exactly a period apart, however late the loop ran each timer.
    """

    SLICES = 8

    __slots__ = ("_due", "_handle", "_loop", "_next", "_slices", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self._slices: list[set[Ticking]] = [set() for _ in range(self.SLICES)]
        self._next = 0  # the slice the next wake-up ticks
        self._due = 0.0  # when the next wake-up is due
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return sum(map(len, self._slices))

    @property
    def armed(self) -> bool:
        """Whether a wake-up is scheduled (only while there are members, or just after)."""
        return self._handle is not None

    def add(self, member: Ticking) -> None:
        # Into the smallest slice: the long-lived members stay spread, whatever comes and goes.
        min(self._slices, key=len).add(member)
        if self._handle is None:
            self._loop = asyncio.get_running_loop()
            self._due = self._loop.time()
            self._arm()

    def discard(self, member: Ticking) -> None:
        # From each slice: cheaper than remembering a member's (a dict entry per stream).
        for members in self._slices:
            members.discard(member)

    def prepare_reload(self, cfg: Config) -> Callable[[], None]:
        """SIGHUP: a shorter upstream limit makes ticks more frequent; nothing makes them
        rarer until a restart. Streams still running keep the limits they started with (and
        `[sse]`, whose heartbeat interval is in the period, takes a restart)."""
        period = min([self.period, *_upstream_limits(cfg)])

        def commit() -> None:
            if period >= self.period:
                return
            self.period = period
            handle, loop = self._handle, self._loop
            if handle is not None and loop is not None:
                # The shorter period from now on, not after a wake-up due later than that.
                if handle.when() > loop.time() + period / self.SLICES:
                    handle.cancel()
                    self._due = loop.time()
                    self._arm()

        return commit

    def _arm(self) -> None:
        assert self._loop is not None
        # The next point of the grid; a loop that fell behind it by more than a step starts
        # a new grid from now rather than catch up in a burst.
        self._due = max(self._due + self.period / self.SLICES, self._loop.time())
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        members = self._slices[self._next]
        self._next = (self._next + 1) % self.SLICES
        now = self._due
        try:
            for member in tuple(members):  # a member may leave while ticked
                try:
                    member.tick(now)
                except Exception:
                    self.discard(member)
                    # A log write that fails (a full stdout) must not skip the slice's others.
                    with contextlib.suppress(Exception):
                        log.exception("tick_failed", member=type(member).__name__)
        finally:
            # Whatever escaped: one failure must not end every stream's checks.
            if any(self._slices):
                self._arm()
            else:
                self._handle = None


TICKER = web.AppKey("ticker", Ticker)
