"""The event log of a detached stream: the interface, and its in-process implementation.

One log per stream id. The generation (its *owner*) appends events; any number of readers,
in this process or (with a shared backend such as Redis) in another one, read them. The
interface is shaped for that:

- event ids are sequence numbers 1, 2, 3, ... given by the log, so an SSE `Last-Event-ID`
  is simply "what I have seen", and a read is "everything after N";
- `read` blocks until there is something after N or the log has ended, so a reader needs
  no other wake-up channel;
- the last event of a log is `done` or `fail` (`FINAL_KINDS`); after it the log is *ended*,
  appends are refused, and `resume_ttl` seconds later the log is freed (reads return None);
- the log is bounded in events and bytes: an append over the bound is refused and the log
  ends with a `fail` event instead (the final event always fits);
- `cancel` (a DELETE, on any process) ends the log with `done` {"finish_reason":
  "cancelled"}; the owner learns of it through `wait_ended` and stops its upstream request.

Another backend implements `EventLog` and is installed at `app[EVENT_LOG]` before the
streams' cleanup context runs (which installs `MemoryEventLog` only when the key is unset).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from ..errors import error_body

DELTA, USAGE, DONE, FAIL = "delta", "usage", "done", "fail"
# Detached streams' event logs (memory, or Redis: chosen in `gateway.backends`).
EVENT_LOG: web.AppKey[EventLog] = web.AppKey("event_log")

FINAL_KINDS = frozenset({DONE, FAIL})

CANCELLED_DATA = '{"finish_reason":"cancelled"}'
OVERFLOW_DATA = error_body(
    "The stream is longer than the gateway keeps for resuming", "server_error", "stream_too_long"
).decode()


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a log: `id` its sequence number (from 1), `kind` one of delta, usage,
    done, fail, `data` its JSON text (sent as the SSE `data:` field)."""

    id: int
    kind: str
    data: str


@dataclass(frozen=True, slots=True)
class Batch:
    """What a read found: the events after N (in order, maybe none), and whether the log has
    ended (then its final event is the last of `events`, or was at or before N)."""

    events: Sequence[Event]
    ended: bool


class EventLog(Protocol):
    """The event logs of detached streams (see the module docstring for the semantics)."""

    async def create(self, stream_id: str) -> None:
        """Start an empty log for a new stream id (the caller makes ids unguessable)."""

    async def append(self, stream_id: str, kind: str, data: str) -> int | None:
        """Append one event; return its id, or None when the log has ended (cancelled, over
        its bound, or already finished, or freed): the owner must then stop generating.
        Appending a `done` or `fail` event ends the log."""

    async def read(
        self, stream_id: str, after: int, *, timeout: float, limit: int = 1000
    ) -> Batch | None:
        """Events with ids > `after` (at most `limit`), waiting up to `timeout` seconds for at
        least one unless the log has ended; an empty unended batch means "nothing yet".
        None when the id is unknown or expired."""

    async def cancel(self, stream_id: str) -> bool:
        """End the log with `done` {"finish_reason": "cancelled"} unless it already ended.
        True when the id is known (ended or not), False when unknown or expired."""

    async def wait_ended(self, stream_id: str) -> None:
        """Return once the log has ended (or is gone). The owner awaits this beside its
        generation to learn of a `cancel` from any process."""

    async def delete(self, stream_id: str) -> bool:
        """`cancel`, then free the log at once (reads return None from now on). True when
        the id was known."""


@dataclass(slots=True)
class _Log:
    events: list[Event] = field(default_factory=list)
    bytes: int = 0
    ended: bool = False
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    end: asyncio.Event = field(default_factory=asyncio.Event)
    expiry: asyncio.TimerHandle | None = None


class MemoryEventLog:
    """`EventLog` in this process's memory: for one gateway process (`backend = "memory"`)."""

    def __init__(
        self, *, max_events: int, max_bytes: int, ttl: float, max_retained_bytes: int = 0
    ) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.ttl = ttl
        # Ended logs are kept `ttl` seconds for replay: without a cap their total grows with
        # the rate of streams times the ttl. Over the cap, the oldest ended ones go first
        # (a late resume of those gets 404, as after the ttl). 0: no cap.
        self.max_retained_bytes = max_retained_bytes
        self._retained = 0
        self._ended: dict[str, None] = {}  # ended ids, oldest first
        self._logs: dict[str, _Log] = {}

    def __len__(self) -> int:
        """Logs held (ended ones until their ttl runs out)."""
        return len(self._logs)

    async def create(self, stream_id: str) -> None:
        if stream_id in self._logs:
            raise ValueError("stream id already in use")
        self._logs[stream_id] = _Log()

    async def append(self, stream_id: str, kind: str, data: str) -> int | None:
        log = self._logs.get(stream_id)
        if log is None or log.ended:
            return None
        size = len(data.encode())
        final = kind in FINAL_KINDS
        # The last slot is kept for the final event, so a log always ends with done/fail.
        if not final and (
            len(log.events) + 1 >= self.max_events or log.bytes + size > self.max_bytes
        ):
            await self._end(stream_id, log, FAIL, OVERFLOW_DATA)
            return None
        return await self._add(stream_id, log, kind, data, size)

    async def _add(self, stream_id: str, log: _Log, kind: str, data: str, size: int) -> int:
        event = Event(len(log.events) + 1, kind, data)
        log.events.append(event)
        log.bytes += size
        if kind in FINAL_KINDS:
            log.ended = True
            log.end.set()
            loop = asyncio.get_running_loop()
            log.expiry = loop.call_later(self.ttl, self._free, stream_id)
            self._retained += log.bytes
            self._ended[stream_id] = None
            while self.max_retained_bytes and self._retained > self.max_retained_bytes:
                self._free(next(iter(self._ended)))
        async with log.changed:
            log.changed.notify_all()
        return event.id

    def _free(self, stream_id: str) -> None:
        log = self._logs.pop(stream_id, None)
        if log is not None and stream_id in self._ended:
            del self._ended[stream_id]
            self._retained -= log.bytes
            if log.expiry is not None:
                log.expiry.cancel()

    async def _end(self, stream_id: str, log: _Log, kind: str, data: str) -> None:
        await self._add(stream_id, log, kind, data, len(data.encode()))

    async def read(
        self, stream_id: str, after: int, *, timeout: float, limit: int = 1000
    ) -> Batch | None:
        log = self._logs.get(stream_id)
        if log is None:
            return None
        if len(log.events) <= after and not log.ended and timeout > 0:
            async with log.changed:
                try:
                    async with asyncio.timeout(timeout):
                        await log.changed.wait_for(
                            lambda: len(log.events) > after or log.ended
                        )
                except TimeoutError:
                    pass
        after = max(after, 0)
        events = log.events[after : after + limit]
        ended = log.ended and after + len(events) >= len(log.events)
        return Batch(events, ended)

    async def cancel(self, stream_id: str) -> bool:
        log = self._logs.get(stream_id)
        if log is None:
            return False
        if not log.ended:
            await self._end(stream_id, log, DONE, CANCELLED_DATA)
        return True

    async def wait_ended(self, stream_id: str) -> None:
        log = self._logs.get(stream_id)
        if log is not None:
            await log.end.wait()

    async def delete(self, stream_id: str) -> bool:
        if not await self.cancel(stream_id):
            return False
        self._free(stream_id)  # ended by the cancel: its retained bytes are given back
        return True

    def close(self) -> None:
        """Drop every log and its expiry timer (at app cleanup)."""
        for log in self._logs.values():
            if log.expiry is not None:
                log.expiry.cancel()
        self._logs.clear()
        self._ended.clear()
        self._retained = 0
