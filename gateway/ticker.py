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


class Ticker:
    """Calls `tick(loop.time())` on each member once every `period` seconds; no timer while
    it has none. A member that raises is logged and leaves; the others are still checked.

    The members are spread over `SLICES` sets, one ticked every `period / SLICES`: with
    thousands of streams open no single wake-up visits them all (8,000 streams' heartbeats
    and watchdogs take about 8 ms to check, which would stall every stream at once).
    """

    SLICES = 8

    __slots__ = ("_added", "_handle", "_loop", "_next", "_slices", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self._slices: list[set[Ticking]] = [set() for _ in range(self.SLICES)]
        self._added = 0  # members go round the slices, so they stay even
        self._next = 0  # the slice the next wake-up ticks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return sum(map(len, self._slices))

    @property
    def armed(self) -> bool:
        """Whether a wake-up is scheduled (only while there are members, or just after)."""
        return self._handle is not None

    def add(self, member: Ticking) -> None:
        self._slices[self._added % self.SLICES].add(member)
        self._added += 1
        if self._handle is None:
            self._loop = asyncio.get_running_loop()
            self._arm()

    def discard(self, member: Ticking) -> None:
        # From each slice: cheaper than remembering a member's (a dict entry per stream).
        for members in self._slices:
            members.discard(member)

    def prepare_reload(self, cfg: Config) -> Callable[[], None]:
        """SIGHUP: a shorter upstream limit makes ticks more frequent; nothing makes them
        rarer until a restart. Streams still running keep the limits they started with (and
        `[sse]`, whose heartbeat interval is in the period, takes a restart)."""
        period = min(self.period, *_upstream_limits(cfg))

        def commit() -> None:
            if period < self.period:
                self.period = period
                if self._handle is not None:  # the shorter period from now, not a tick later
                    self._handle.cancel()
                    self._arm()

        return commit

    def _arm(self) -> None:
        assert self._loop is not None
        self._handle = self._loop.call_later(self.period / self.SLICES, self._tick)

    def _tick(self) -> None:
        members = self._slices[self._next]
        self._next = (self._next + 1) % self.SLICES
        assert self._loop is not None
        now = self._loop.time()
        try:
            for member in tuple(members):  # a member may leave while ticked
                try:
                    member.tick(now)
                except Exception:
                    self.discard(member)
                    log.exception("tick_failed", member=type(member).__name__)
        finally:
            # Even if the error path itself failed (a log write): one failure must not end
            # every stream's checks.
            if any(self._slices):
                self._arm()
            else:
                self._handle = None


TICKER = web.AppKey("ticker", Ticker)
