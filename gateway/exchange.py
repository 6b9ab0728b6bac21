"""One request's record: filled as the request goes, written as one access-log line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from yarl import URL

from .usage.tap import Usage, UsageTap

Outcome = Literal["completed", "client_disconnected", "upstream_error", "timeout", "rejected"]


@dataclass(slots=True)
class Exchange:
    request_id: str
    trace_id: str
    span_id: str  # the gateway's own span, sent upstream in traceparent
    trace_flags: str
    started: float  # loop.time() at arrival
    client: str | None = None
    ip: str | None = None  # the caller's address (gateway.clientip): set by the per-IP throttle
    model: str | None = None
    stream: bool = False
    status: int = 0
    outcome: Outcome = "completed"
    ttfb: float | None = None  # loop.time() of the first body byte written
    upstream: str | None = None
    attempts: int = 0
    usage: Usage | None = None
    delivered: bool = False  # the client had the whole answer even if it left before our end
    reason: str | None = None  # why it was throttled: "ip_rpm", "rpm", "tpm", "concurrency"
    parent_id: str | None = None  # the incoming traceparent's span id, when continued
    otel: Spans | None = None  # this request's spans; None while tracing is off

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.trace_flags}"


class Spans(Protocol):
    """A traced request's spans, as the pool and the relay report to them (the one
    implementation is `gateway.otel.RequestTrace`, imported only when tracing is on)."""

    def detached(self, ex: Exchange) -> None: ...

    def attempt(
        self, upstream: str, base: URL, ex: Exchange, method: str, path: str, now: float
    ) -> str: ...

    def answered(self, status: int) -> None: ...

    def failed(self, exc: BaseException) -> None: ...

    def retry(self, attempt: int, upstream: str) -> None: ...

    def breaker_refused(self, upstream: str) -> None: ...

    def stalled(self, silent: float) -> None: ...

    def streamed(self, tap: UsageTap) -> None: ...

    def response(self, obj: Mapping[str, object]) -> None: ...

    def finish(self, ex: Exchange, outcome: str | None = None) -> None: ...
