"""The one streaming core: an upstream SSE body, pumped event-whole into a sink.

Both handlers that stream an upstream answer use it, and differ only in their sink:

    relay (`gateway.relay`)              sink: the client's StreamResponse, bytes as they are
    detached generation (`gateway.streams.generation`)
                                         sink: the stream's EventLog, as delta/usage/done/fail

`Pump.run` is a plain loop: read what the upstream has, cut it at the last complete event
(`sse.EventSplitter`), pass it through the usage tap (`usage.tap.UsageTap`: a byte test, JSON
only on the chunk carrying usage or a finish reason), hand it to the sink. Nothing per chunk
but the bytes, two byte counts and the sink's own work: one `send` per upstream read.

It decides, in one place, how a stream ends:

    completed        `data: [DONE]` seen (or, with `require_done=False`, a clean close); a
                     last event that lacked its blank line is completed, not dropped; any
                     failure after `[DONE]` (waiting for the close) is no failure at all
    upstream_error   upstream_disconnected (connection lost), event_too_large (an event over
                     `max_event_bytes`), stream_truncated (closed without `[DONE]`), or an
                     error the sink found in the stream (`SinkFailed`)
    timeout          upstream_timeout (silence over the idle timeout), or the gateway's
                     shutdown grace ran out (`ShuttingDown`)

and what it cost (`Pump.usage`): the upstream's usage when it sent one, else an estimate of
one completion token per data event relayed (a stream cut by the upstream, by its client or
by a DELETE is charged what it delivered; the prompt's size is not known here).

A sink is two coroutines (see `Sink`); a new kind of consumer (background responses, say)
writes one and reuses the rest. Exceptions a sink raises other than `SinkFailed` (a client
gone, a log that refused an append, a cancellation) pass through `run` unchanged; `usage` is
still right afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import aiohttp

from .errors import error_body
from .exchange import Outcome
from .process.drain import ShuttingDown
from .sse import EventSplitter, SSEError
from .usage.tap import Usage, UsageTap, json_object

__all__ = ["Failure", "Pump", "Sink", "SinkFailed", "data_events", "json_object"]


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a stream ended early: the access-log outcome and the OpenAI error object."""

    outcome: Outcome
    body: bytes  # `{"error": {"message", "type", "code"}}`

    @classmethod
    def of(cls, outcome: Outcome, message: str, type_: str, code: str) -> Failure:
        return cls(outcome, error_body(message, type_, code))

    def sse_event(self) -> bytes:
        """The failure as the last event of a relayed stream: `data: {"error": ...}`."""
        return b"data: " + self.body + b"\n\n"


TIMEOUT = Failure.of("timeout", "upstream timed out", "timeout", "upstream_timeout")
DISCONNECTED = Failure.of(
    "upstream_error", "upstream connection lost", "upstream_error", "upstream_disconnected"
)
TRUNCATED = Failure.of(
    "upstream_error", "upstream ended the stream early", "upstream_error", "stream_truncated"
)


def failure_of(exc: Exception) -> Failure | None:
    """The one mapping of what a read of the upstream body can raise; None: not ours."""
    if isinstance(exc, ShuttingDown):
        return Failure("timeout", exc.body())
    if isinstance(exc, TimeoutError):
        return TIMEOUT
    if isinstance(exc, SSEError):
        return Failure.of("upstream_error", str(exc), "upstream_error", "event_too_large")
    if isinstance(exc, aiohttp.ClientError):
        return DISCONNECTED
    return None


class SinkFailed(Exception):
    """Raised by a sink that found the stream failed (an upstream `{"error": ...}` chunk):
    the pump stops reading and ends the stream with `failure`."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.body.decode())
        self.failure = failure


class Sink(Protocol):
    """Where a pumped stream's events go."""

    async def send(self, block: bytes) -> None:
        """Take a block of whole SSE events, as the upstream sent them (minus what the usage
        tap stripped); never empty. May raise `SinkFailed` to end the stream."""

    async def fail(self, failure: Failure) -> None:
        """The stream failed: write `failure` as its last event. Not called after a
        completed stream, and not after the sink raised `SinkFailed` for anything but
        that same failure (it is called with it, once)."""


def data_events(block: bytes) -> int:
    """Data events in a block of whole events: `data:` fields at a line start.

    Content cannot forge one: a line break inside JSON text is always escaped, so the bytes
    `data:` in a delta's text never start a line. (An event of OpenAI-compatible streams has
    one data line; one spread over several lines counts each.)
    """
    return (
        block.count(b"\ndata:") + block.count(b"\rdata:") + (1 if block[:5] == b"data:" else 0)
    )


class Pump:
    """Pump one upstream SSE body into a sink; then tells how it ended and what it cost.

    `strip`: remove the usage the gateway asked for and the client did not (relayed Chat
    Completions, see `UsageTap`). `require_done`: a close without `data: [DONE]` is a
    truncation (Chat/Completions); the Responses API ends with a clean close instead.
    """

    __slots__ = ("events", "tap", "_require_done", "_splitter")

    def __init__(self, max_event_bytes: int, *, strip: bool, require_done: bool) -> None:
        self._splitter = EventSplitter(max_event_bytes)
        self._require_done = require_done
        self.tap = UsageTap(strip)
        self.events = 0  # data events handed on, [DONE] included

    @property
    def done(self) -> bool:
        """`data: [DONE]` has been passed on: the reader has the whole answer."""
        return self.tap.done

    @property
    def usage(self) -> Usage | None:
        """The upstream's usage, else one completion token per data event handed on (never
        counting `[DONE]`), else None (nothing was delivered)."""
        if self.tap.usage is not None:
            return self.tap.usage
        n = self.events - self.tap.done
        return Usage(completion_tokens=n, total_tokens=n) if n > 0 else None

    async def run(self, resp: aiohttp.ClientResponse, sink: Sink) -> Outcome:
        """Read `resp` to its end into `sink`; on failure the sink's last event says why.

        Returns the outcome; exceptions from the sink (but `SinkFailed`) propagate.
        """
        read = resp.content.readany
        feed = self._splitter.feed
        process = self.tap.process
        send = sink.send
        failure: Failure | None = None
        try:
            while True:
                try:
                    data = await read()
                    if not data:
                        break
                    block = feed(data)
                except Exception as exc:  # mapped by `failure_of`, or re-raised
                    if (failure := failure_of(exc)) is None:
                        raise
                    break
                if block:
                    self.events += data_events(block)
                    block = process(block)
                    if block:
                        await send(block)
                # Not held while the next read waits (a minute, on a slow model): 8,000
                # open streams would keep their last event twice over.
                data = block = b""
            if failure is None and (rest := self._splitter.flush()).strip():
                # The last event lacked its blank line: complete it rather than drop it.
                block = rest.rstrip(b"\r\n") + b"\n\n"
                self.events += data_events(block)
                if block := process(block):
                    await send(block)
        except SinkFailed as exc:
            failure = exc.failure
        if failure is None and self._require_done and not self.tap.done:
            failure = TRUNCATED  # the reader must not mistake a cut stream for a whole one
        if failure is None or self.tap.done:
            return "completed"  # a failure after [DONE] cost the reader nothing
        await sink.fail(failure)
        return failure.outcome
