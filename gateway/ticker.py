"""One timer for every open stream's periodic checks.

A stream is checked now and then, never per chunk: its heartbeat (`: ping` after a silence),
its write deadline (a client that takes no byte) and its upstream watchdog (idle and total
limits). On a loop timer each, every stream held two or three timers (with uvloop a libuv
timer each, about 0.8 KiB) and armed and cancelled them once per stream. Like nginx's one
timer tree for all its connections, the app keeps one `Ticker` (`TICKER`): while anything is
watched, it wakes every `period` seconds and calls each member's `tick(now)`. A member
decides on its own clock whether anything is due, so a check is late by at most `period`
(`tick_period`: at most 1 s, and a fraction of the shortest interval the config sets).
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
    limits = (min(u.idle_timeout, u.total_timeout) / 8 for u in cfg.upstreams)
    return min(1.0, cfg.sse.heartbeat_interval / 4, *limits)


class Ticker:
    """Calls `tick(loop.time())` on each member every `period` seconds; no timer while it
    has none. A member that raises is logged and leaves; the others are still checked."""

    __slots__ = ("_handle", "_members", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self._members: set[Ticking] = set()
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._members)

    def add(self, member: Ticking) -> None:
        self._members.add(member)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.period, self._tick)

    def discard(self, member: Ticking) -> None:
        self._members.discard(member)

    def prepare_reload(self, cfg: Config) -> Callable[[], None]:
        period = tick_period(cfg)

        def commit() -> None:
            self.period = period  # from the next tick on

        return commit

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for member in tuple(self._members):  # a member may leave while ticked
            try:
                member.tick(now)
            except Exception:
                self._members.discard(member)
                log.exception("tick_failed", member=type(member).__name__)
        self._handle = loop.call_later(self.period, self._tick) if self._members else None


TICKER = web.AppKey("ticker", Ticker)
