"""Draining: what SIGTERM does to the requests already in the process.

    SIGTERM -> begin(): /readyz answers 503, new /v1 work gets 503 "draining"
            -> (the server stops accepting connections)
            -> wait_idle(shutdown_grace): in-flight requests may finish
            -> end_inflight(): the rest are ended cleanly

Ending cleanly: every relayed upstream response is registered in `responses` while it is
being relayed (one set add/discard per request, nothing per chunk). At the deadline its body
reader is failed with `ShuttingDown`, so the relay loop's next read raises it and the relay
writes its own `data: {"error": ...}` event and ends the response, as for any other failure
after the first byte. Parts that keep their own long-lived work (detached streams) register a
hook with `on_deadline()`: it runs at the same moment and should leave that work resumable
where the backend keeps it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import structlog
from aiohttp import web

from ..aiohttp_seams import fail_body
from ..errors import Unavailable, sse_error_event

log = structlog.get_logger("gateway.drain")

DeadlineHook = Callable[[], Awaitable[None]]


# Shutdown state: the draining flag, in-flight upstream responses.
DRAIN: web.AppKey[Drain] = web.AppKey("drain")

class ShuttingDown(Unavailable):
    """The gateway stopped this request because its shutdown grace ran out."""

    default_code = "gateway_shutting_down"

    def sse_event(self) -> bytes:
        return sse_error_event(self.message, self.type, self.code)


class Drain:
    """The app's shutdown state: one per app, under `DRAIN`."""

    __slots__ = ("draining", "inflight", "responses", "_idle", "_hurry", "_hooks")

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0  # requests inside the drain middleware
        self.responses: set[aiohttp.ClientResponse] = set()  # upstream bodies being relayed
        self._idle = asyncio.Event()
        self._hurry = asyncio.Event()  # a second SIGTERM/SIGINT: end the grace now
        self._hooks: list[tuple[str, DeadlineHook]] = []

    def readiness(self) -> str | None:
        """A `ReadinessChecks` check: not ready once draining."""
        return "draining" if self.draining else None

    def on_deadline(self, name: str, hook: DeadlineHook) -> None:
        """Run `hook` when the grace period ends (e.g. detached streams park their readers)."""
        self._hooks.append((name, hook))

    def enter(self) -> None:
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1
        if self.draining and self.inflight <= 0:
            self._idle.set()

    def begin(self) -> None:
        """Stop taking new work: readiness fails, new requests get 503."""
        self.draining = True
        if self.inflight <= 0:
            self._idle.set()

    def hurry(self) -> None:
        """Cut the grace short (a second signal): `wait_idle` returns at once."""
        self._hurry.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False when `timeout` ran out (or `hurry()`)."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._idle, self._hurry)]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return self._idle.is_set()

    async def end_inflight(self) -> None:
        """The grace is over: fail every relayed upstream body, run the deadline hooks."""
        exc = ShuttingDown("the gateway is shutting down; retry the request")
        for resp in list(self.responses):
            # The relay's pending (or next) read raises `exc`; the relay then writes its
            # error event, ends the response and closes the upstream connection itself.
            fail_body(resp, exc)
        for name, hook in self._hooks:
            try:
                await hook()
            except Exception:
                log.exception("deadline_hook_failed", hook=name)
