"""The span exporter: OTLP/HTTP with protobuf, the official messages built in place.

The messages are `opentelemetry-proto`'s, the bytes are the ones the SDK's own encoder
(`opentelemetry-exporter-otlp-proto-common`) makes for the same spans of one resource, as
the gateway's all are (tests/test_otlp.py checks it byte for byte). What differs is how
they are built. The SDK's encoder builds every attribute, span and list as a message from
keyword arguments, and each parent copies its children in: a span is copied three times
over before it is serialised. That was 74 µs of CPU per traced request (two spans, 19
attributes), more than half of what tracing may cost a stream (`make bench`: at most 25%
more CPU than with tracing off). Here each message is added to its parent and filled where
it lies: 23 µs.

The SDK's `OTLPSpanExporter` sends with its encoder and nothing else, so the POST is here
too, as OTLP/HTTP asks: 2xx is taken; 429, 502, 503, 504, a refused or reset connection and
a timeout are retried with backoff (or the collector's `Retry-After`) until the export's
timeout; anything else fails at once; a redirect is not followed, so the collector's auth
headers go nowhere else.

Imported only when `[tracing]` is on, like gateway.otel.
"""

from __future__ import annotations

import random
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import urllib3
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PBSpan
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PBStatus
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

_KIND = {
    SpanKind.INTERNAL: PBSpan.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: PBSpan.SPAN_KIND_SERVER,
    SpanKind.CLIENT: PBSpan.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: PBSpan.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: PBSpan.SPAN_KIND_CONSUMER,
}
_STATUS = {
    StatusCode.UNSET: PBStatus.STATUS_CODE_UNSET,
    StatusCode.OK: PBStatus.STATUS_CODE_OK,
    StatusCode.ERROR: PBStatus.STATUS_CODE_ERROR,
}
_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK

RETRYABLE = frozenset({429, 502, 503, 504})
MAX_TRIES = 6
MAX_ANSWER = 64 * 1024  # bytes of a collector's answer read (as sent: never inflated)
CONTENT_TYPE = "application/x-protobuf"


# ------------------------------------------------------------------ encoding


def encode(spans: Sequence[ReadableSpan]) -> bytes:
    """One ExportTraceServiceRequest for `spans`, serialised. Spans in a row with the same
    resource and scope share a ResourceSpans and a ScopeSpans (the gateway's all do)."""
    request = ExportTraceServiceRequest()
    resource = scope = add_span = None
    for span in spans:
        if add_span is None or span.resource is not resource:
            resource = span.resource
            out = request.resource_spans.add()
            out.resource.SetInParent()
            _attributes(out.resource.attributes, resource.attributes)
            if resource.schema_url:
                out.schema_url = resource.schema_url
            scope = add_span = None
        if add_span is None or span.instrumentation_scope is not scope:
            scope = span.instrumentation_scope
            scoped = out.scope_spans.add()
            scoped.scope.SetInParent()
            if scope is not None:
                scoped.scope.name = scope.name
                if scope.version:
                    scoped.scope.version = scope.version
                _attributes(scoped.scope.attributes, scope.attributes)
                if scope.schema_url:
                    scoped.schema_url = scope.schema_url
            add_span = scoped.spans.add
        _span(add_span(), span)
    data: bytes = request.SerializeToString()
    return data


def _span(out: PBSpan, span: ReadableSpan) -> None:
    context = span.context
    out.trace_id = context.trace_id.to_bytes(16, "big")
    out.span_id = context.span_id.to_bytes(8, "big")
    if context.trace_state:
        out.trace_state = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
    if span.parent is not None:
        out.parent_span_id = span.parent.span_id.to_bytes(8, "big")
    out.flags = _flags(span.parent)
    out.name = span.name
    out.kind = _KIND[span.kind]
    if span.start_time is not None:
        out.start_time_unix_nano = span.start_time
    if span.end_time is not None:
        out.end_time_unix_nano = span.end_time
    _attributes(out.attributes, span.attributes)
    for event in span.events:
        pb_event = out.events.add()
        pb_event.name = event.name
        pb_event.time_unix_nano = event.timestamp
        _attributes(pb_event.attributes, event.attributes)
        pb_event.dropped_attributes_count = event.dropped_attributes
    for link in span.links:
        pb_link = out.links.add()
        pb_link.trace_id = link.context.trace_id.to_bytes(16, "big")
        pb_link.span_id = link.context.span_id.to_bytes(8, "big")
        _attributes(pb_link.attributes, link.attributes)
        pb_link.dropped_attributes_count = link.dropped_attributes
        pb_link.flags = _flags(link.context)
    out.dropped_attributes_count = span.dropped_attributes
    out.dropped_events_count = span.dropped_events
    out.dropped_links_count = span.dropped_links
    out.status.SetInParent()
    out.status.code = _STATUS[span.status.status_code]
    if span.status.description:
        out.status.message = span.status.description


def _flags(context: SpanContext | None) -> int:
    """A span's or a link's flags: whether the context it points to is remote is known."""
    if context is not None and context.is_remote:
        return _HAS_IS_REMOTE | _IS_REMOTE
    return _HAS_IS_REMOTE


def _attributes(out: Any, attributes: Mapping[str, Any] | None) -> None:
    """`attributes` added to the repeated KeyValue `out`. One that OTLP cannot carry (a
    value past int64, a string with a lone surrogate, a type it has no field for) is left
    out, as the SDK's encoder leaves it out: the rest of the batch still goes."""
    if not attributes:
        return
    add = out.add
    for key, value in attributes.items():
        kv = add()
        try:
            kv.key = key
            _value(kv.value, value)
        except (TypeError, ValueError, RecursionError):
            del out[-1]


def _value(out: AnyValue, value: object) -> None:
    # In the SDK encoder's order: a bool is an int, a str is a Sequence.
    if isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, int):
        out.int_value = value
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, bytes):
        out.bytes_value = value
    elif value is None:
        out.SetInParent()
    elif isinstance(value, Sequence):
        out.array_value.SetInParent()
        add = out.array_value.values.add
        for item in value:
            _value(add(), item)
    elif isinstance(value, Mapping):
        out.kvlist_value.SetInParent()
        add = out.kvlist_value.values.add
        for key, item in value.items():
            kv = add()
            kv.key = str(key)
            _value(kv.value, item)
    else:
        raise TypeError(f"no OTLP value for {type(value).__name__}")


# ------------------------------------------------------------------ sending


class OTLPExporter(SpanExporter):
    """POSTs each batch to `endpoint`; blocking, on the batch processor's thread."""

    def __init__(self, endpoint: str, headers: Mapping[str, str], timeout: float) -> None:
        self._endpoint = endpoint
        self._headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        self._headers["Content-Type"] = CONTENT_TYPE
        self._timeout = timeout
        # One connection, kept alive between batches; urllib3 retries nothing itself.
        self._http = urllib3.PoolManager(num_pools=1, maxsize=1, retries=False)
        self._stopping = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stopping.is_set():
            return SpanExportResult.FAILURE
        body = encode(spans)
        deadline = time.monotonic() + self._timeout
        for attempt in range(MAX_TRIES):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            delay = 2**attempt * random.uniform(0.8, 1.2)
            try:
                resp = self._http.request(
                    "POST",
                    self._endpoint,
                    body=body,
                    headers=self._headers,
                    # Each connect and read waits at most what is left (not the whole
                    # exchange: a collector that dribbles its headers holds it longer).
                    timeout=urllib3.Timeout(total=left),
                    redirect=False,
                    preload_content=False,
                )
            except urllib3.exceptions.HTTPError as exc:
                if not transient(exc):
                    return SpanExportResult.FAILURE
            else:
                _read_out(resp, deadline)
                if 200 <= resp.status < 300:
                    return SpanExportResult.SUCCESS
                if resp.status not in RETRYABLE:
                    return SpanExportResult.FAILURE
                delay = retry_after(resp.headers.get("Retry-After"), delay)
            finally:
                if self._stopping.is_set():  # a pool shutdown() cleared may have been remade
                    self._http.clear()
            if delay >= deadline - time.monotonic() or self._stopping.wait(delay):
                break
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        """Abandons a retry in progress; later batches fail at once."""
        self._stopping.set()
        self._http.clear()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is held here between exports


def transient(exc: urllib3.exceptions.HTTPError) -> bool:
    """What a retry can mend: a connection refused, reset or timed out, or a TLS handshake
    the far end hung up on (a collector restarting); not a certificate that does not
    verify, nor a URL or proxy that cannot work."""
    if isinstance(exc, urllib3.exceptions.TimeoutError | urllib3.exceptions.ProtocolError):
        return True
    return isinstance(exc, urllib3.exceptions.SSLError) and isinstance(
        exc.__context__, ssl.SSLEOFError
    )


def _read_out(resp: urllib3.BaseHTTPResponse, deadline: float) -> None:
    """Read the answer's body so that its connection can carry the next batch: as sent
    (a gzip body is not inflated), MAX_ANSWER bytes at most, each read waiting only until
    `deadline`. Its status is the answer; a body with more to come is left, and its
    connection closed."""
    got = 0
    sock = getattr(resp.connection, "sock", None)  # http.client's: urllib3 set its timeout
    try:
        while got <= MAX_ANSWER and (left := deadline - time.monotonic()) > 0:
            if sock is not None:
                sock.settimeout(left)
            chunk = resp.read1(min(16384, MAX_ANSWER + 1 - got), decode_content=False)
            if not chunk:
                resp.release_conn()
                return
            got += len(chunk)
    except (urllib3.exceptions.HTTPError, OSError):
        pass
    resp.close()
    resp.release_conn()


def retry_after(header: str | None, default: float) -> float:
    """A `Retry-After` of delay-seconds, else `default` (an HTTP date, or garbage)."""
    if header is not None:
        try:
            seconds = float(header)
        except ValueError:
            return default
        if 0 <= seconds < float("inf"):
            return seconds
    return default
