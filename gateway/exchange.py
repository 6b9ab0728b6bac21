"""One request's record: filled as the request goes, written as one access-log line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .usage.tap import Usage

if TYPE_CHECKING:
    from .otel import RequestTrace

Outcome = Literal["completed", "client_disconnected", "upstream_error", "timeout", "rejected"]


@dataclass(slots=True)
class Exchange:
    request_id: str
    trace_id: str
    span_id: str  # the gateway's own span, sent upstream in traceparent
    trace_flags: str
    started: float  # loop.time() at arrival
    client: str | None = None
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
    otel: RequestTrace | None = None  # this request's spans; None while tracing is off

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.trace_flags}"
