"""OpenTelemetry traces over OTLP/HTTP, when `[tracing].endpoint` is set.

One trace per request, laid out as an operator reads it:

    SERVER  "POST /v1/chat/completions"      the request, ids = the access line's
      CLIENT  "chat gpt-4o" (attempt 1)      one per upstream try; its id is the
      CLIENT  "chat gpt-4o" (attempt 2)      traceparent that try sent upstream

A detached generation (POST /v1/streams) gets a span of its own in a trace of its own,
linked to the request that started it: it outlives that request.

Off (no endpoint), nothing of this module is imported: `Exchange.otel` stays None and every
hook is one `is None` test. On, export never touches traffic: spans are queued for the SDK's
`BatchSpanProcessor` thread, which encodes and sends them (gateway.otlp), behind a bound (a
span that does not fit is dropped and counted in `gateway_trace_spans_dropped_total`, as are
spans the collector did not take), and the collector's state is logged once per change
(`collector_unreachable`, `collector_reachable`).

Attributes follow the HTTP and GenAI semantic conventions; never a prompt or completion text.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue
from yarl import URL

from .config import TracingConfig
from .logs import loggable_path
from .otlp import OTLPExporter
from .usage.tap import UsageTap, first_choice

if TYPE_CHECKING:
    from prometheus_client import Counter

    from .exchange import Exchange

log = structlog.get_logger("gateway.otel")

TRACING: web.AppKey[Tracing] = web.AppKey("tracing")

# gen_ai.operation.name by upstream path (https://opentelemetry.io/docs/specs/semconv/gen-ai/).
_OPERATIONS = {
    "/chat/completions": "chat",
    "/completions": "text_completion",
    "/embeddings": "embeddings",
    "/responses": "chat",
}
# Upstream answers that end an attempt as failed (the pool retries them).
_FAILED_STATUS = frozenset({429, 500, 502, 503, 504})
_FAILED_OUTCOMES = frozenset({"timeout", "upstream_error", "error"})
MAX_QUEUE = 2048
# Values that come from a client (model, path) or an upstream are cut to this many characters:
# a megabyte model name must not become a megabyte span.
MAX_VALUE = 256
EXPORT_TIMEOUT = 5.0  # seconds per export request to the collector
SHUTDOWN_TIMEOUT = 3.0  # at stop, what the last spans may take to leave


_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSET = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)
MAX_EVENTS = 128  # per span, the SDK's default limit: a long stall pings for hours


def _cut(value: str) -> str:
    """A string from a client or an upstream, as spans carry it: cut where it comes in."""
    return value[:MAX_VALUE]


class Span:
    """One span: what it needs to become the SDK's `ReadableSpan` when it ends.

    The SDK's own `Span` guards every attribute with a lock, keeps bounded maps and a
    context object per span, and costs more than the request it describes (`make bench`,
    tracing on): a gateway span is written by one task, on the loop, so it is a plain
    record here, turned into a `ReadableSpan` for the SDK's batch processor and the
    exporter (gateway.otlp) at `end()`. An unsampled span records nothing; its context still
    gives the ids and flags a traceparent carries.
    """

    __slots__ = (
        "_tracing",
        "attributes",
        "context",
        "events",
        "kind",
        "links",
        "name",
        "parent",
        "start",
        "status",
    )

    def __init__(
        self,
        tracing: Tracing | None,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        links: Sequence[Link] = (),
    ) -> None:
        self._tracing = tracing  # None: not sampled
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.links = links
        self.events: Sequence[Event] = ()  # a BoundedList from the first event on
        self.status = _UNSET
        self.start = time.time_ns()

    @property
    def recording(self) -> bool:
        return self._tracing is not None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._tracing is not None:
            self.attributes[key] = value

    def add_event(self, name: str, attributes: dict[str, AttributeValue] | None = None) -> None:
        if self._tracing is None:
            return
        if not isinstance(self.events, BoundedList):
            # The SDK's own: past MAX_EVENTS it keeps the latest and counts the dropped.
            self.events = BoundedList(MAX_EVENTS)
        self.events.append(Event(name, attributes or {}, time.time_ns()))

    def set_error(self) -> None:
        if self._tracing is not None:
            self.status = _ERROR

    def end(self) -> None:
        tracing, self._tracing = self._tracing, None  # ended once
        if tracing is None:
            return
        # Its docstring says a ReadableSpan is the SDK pipeline's to make; its constructor
        # is the one the SDK's exporters and test helpers use, keyword by keyword.
        tracing.on_end(
            ReadableSpan(
                name=self.name,
                context=self.context,
                parent=self.parent,
                resource=tracing.resource,
                attributes=self.attributes,
                events=self.events,
                links=self.links,
                kind=self.kind,
                status=self.status,
                start_time=self.start,
                end_time=time.time_ns(),
                instrumentation_scope=tracing.scope,
            )
        )


class _WatchedExporter(SpanExporter):
    """The OTLP exporter, watched: what the collector did not take is counted as dropped,
    and its state is logged once per change, not once per failed batch."""

    def __init__(self, inner: SpanExporter, dropped: Counter, endpoint: str) -> None:
        self._inner = inner
        self._dropped = dropped
        self._endpoint = endpoint
        self.reachable = True
        self.taken = _Gauge()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken.sub(len(spans))  # out of the queue, into this batch
        try:
            result = self._inner.export(spans)
        except Exception:  # the SDK's exporter reports failures; anything else is one too
            result = SpanExportResult.FAILURE
        ok = result is SpanExportResult.SUCCESS
        if not ok:
            self._dropped.inc(len(spans))
        if ok != self.reachable:
            self.reachable = ok
            if ok:
                log.info("collector_reachable", endpoint=self._endpoint)
            else:
                log.warning(
                    "collector_unreachable",
                    endpoint=self._endpoint,
                    detail="spans are dropped (gateway_trace_spans_dropped_total) until it is back",
                )
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _Gauge:
    """A count shared by the event loop (adds) and the export thread (takes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add_below(self, bound: int) -> bool:
        with self._lock:
            if self.value >= bound:
                return False
            self.value += 1
            return True

    def sub(self, n: int) -> None:
        with self._lock:
            self.value -= n


class _BoundedBatch(SpanProcessor):
    """The SDK's BatchSpanProcessor behind a bound of our own: when `max_queue` spans wait,
    a new one is dropped here and counted (the SDK alone would drop the oldest, uncounted,
    with a log line each)."""

    def __init__(self, exporter: _WatchedExporter, max_queue: int, dropped: Counter) -> None:
        self._queued = exporter.taken
        self._exporter = exporter
        self._max = max_queue
        self._dropped = dropped
        self._batch = BatchSpanProcessor(
            exporter,
            max_queue_size=max_queue,
            schedule_delay_millis=1000,
            # Half the queue a request: the collector's POST, and the grouping by resource
            # the encoder does per batch, cost per batch, not per span.
            max_export_batch_size=max(1, max_queue // 2),
        )

    def on_end(self, span: ReadableSpan) -> None:
        if not self._queued.add_below(self._max):
            self._dropped.inc()
            return
        self._batch.on_end(span)

    def shutdown(self) -> None:
        """Export what is queued, for SHUTDOWN_TIMEOUT at most: past it (a collector that
        hangs), the exporter is shut down, which abandons its retries and the rest."""
        done = threading.Thread(target=self._batch.shutdown, name="otel-shutdown", daemon=True)
        done.start()
        done.join(SHUTDOWN_TIMEOUT)
        if done.is_alive():
            self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)


class Tracing:
    """The app's tracer: made by `create_app` when `[tracing].endpoint` is set, its export
    thread started and stopped by `tracing_ctx`."""

    def __init__(
        self,
        cfg: TracingConfig,
        dropped: Counter,
        *,
        max_queue: int = MAX_QUEUE,
        exporter: SpanExporter | None = None,
    ) -> None:
        self.cfg = cfg
        self.resource = Resource.create({"service.name": cfg.service_name})
        self.scope = InstrumentationScope("gateway")
        # The SDK's own sampler decides a root (as every SDK-traced service does, by id).
        self._ratio = TraceIdRatioBased(cfg.sample_ratio)
        self._ids = RandomIdGenerator()
        self._dropped = dropped
        self._max_queue = max_queue
        self._exporter = exporter or OTLPExporter(
            cfg.endpoint, dict(cfg.headers), timeout=EXPORT_TIMEOUT
        )
        self.watched: _WatchedExporter | None = None
        self._processor: _BoundedBatch | None = None

    def start(self) -> None:
        """Start the export thread (a processor added later sees only later spans)."""
        # The batch processor logs a failed export every time: ours say it once per change
        # of the collector's state.
        logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.CRITICAL)
        self.watched = _WatchedExporter(self._exporter, self._dropped, self.cfg.endpoint)
        self._processor = _BoundedBatch(self.watched, self._max_queue, self._dropped)

    def stop(self) -> None:
        """Blocking (run it in a thread): the last spans go out, within SHUTDOWN_TIMEOUT."""
        if self._processor is not None:
            self._processor.shutdown()

    def flush(self) -> bool:
        """Blocking: export what is queued now (tests, and a stop with time left)."""
        return self._processor.force_flush() if self._processor is not None else True

    # ------------------------------------------------------------------ spans

    def on_end(self, span: ReadableSpan) -> None:
        if self._processor is not None:  # before start() (and in no test after stop())
            self._processor.on_end(span)

    def start_span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        parent: SpanContext | None = None,
        links: Sequence[Link] = (),
        attributes: Mapping[str, AttributeValue] | None = None,
        trace_id: int | None = None,
        span_id: int | None = None,
    ) -> Span:
        """A span, sampled as the SDK's ParentBased sampler would: a child follows its
        parent, a root linked to spans follows them (a detached generation, its request),
        any other root is sampled at `sample_ratio` by its trace id."""
        if parent is not None:
            trace_id = parent.trace_id
            sampled = parent.trace_flags.sampled
        else:
            if trace_id is None:
                trace_id = self._ids.generate_trace_id()
            if links:
                sampled = any(link.context.trace_flags.sampled for link in links)
            else:
                # TraceIdRatioBased's own test, without the SamplingResult it builds.
                sampled = trace_id & self._ratio.TRACE_ID_LIMIT < self._ratio.bound
        context = SpanContext(
            trace_id,
            span_id or self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=_SAMPLED if sampled else _NOT_SAMPLED,
        )
        if not sampled:
            return Span(None, name, context, parent, kind, {})
        attrs = dict(attributes) if attributes else {}
        return Span(self, _cut(name), context, parent, kind, attrs, links)

    def request(self, request: web.Request, ex: Exchange) -> None:
        """The tracing middleware's hook: the SERVER span, with the exchange's own ids,
        child of the incoming traceparent the middleware continued (`ex.parent_id`)."""
        parent = None
        if ex.parent_id is not None:
            parent = SpanContext(
                int(ex.trace_id, 16),
                int(ex.parent_id, 16),
                is_remote=True,
                trace_flags=TraceFlags(int(ex.trace_flags, 16)),
            )
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        # A detached stream's id is its credential: cut to a prefix, as the access line does.
        method = _cut(request.method)
        path = _cut(loggable_path(request.path))
        attrs: dict[str, str] = {"http.request.method": method, "url.path": path}
        if route is not None:
            attrs["http.route"] = route
        span = self.start_span(
            f"{method} {route}" if route else method,
            kind=SpanKind.SERVER,
            parent=parent,
            attributes=attrs,
            trace_id=int(ex.trace_id, 16),
            span_id=int(ex.span_id, 16),
        )
        ex.trace_flags = "01" if span.recording else "00"
        ex.otel = RequestTrace(self, span)

    def finished(self, request: web.Request, ex: Exchange, now: float) -> None:
        """The app's finish hook (`state.FINISHED`): close the request's spans."""
        t = ex.otel
        if t is None:
            return
        if isinstance(t, RequestTrace):
            address = ex.ip or request.remote or ""
            t.server.set_attribute("client.address", address)
        t.finish(ex)


class RequestTrace:
    """One request's (or one detached generation's) spans: the outer span and the upstream
    attempt in flight. The pool and the relay call it through `Exchange.otel`."""

    __slots__ = (
        "_sent",
        "attempt_span",
        "finish_reason",
        "response_id",
        "response_model",
        "server",
        "tracing",
    )

    def __init__(self, tracing: Tracing, server: Span) -> None:
        self.tracing = tracing
        self.server = server
        self.attempt_span: Span | None = None
        self._sent = 0.0
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.finish_reason: str | None = None

    def detached(self, ex: Exchange) -> None:
        """A detached generation started by this request: a span in a trace of its own (it
        outlives the request), linked to this request's SERVER span and sampled with it.
        `ex`, the generation's own exchange, takes that trace's ids."""
        span = self.tracing.start_span(
            f"generation {ex.model or ''}",
            kind=SpanKind.INTERNAL,
            links=(Link(self.server.context),),
            attributes={
                "gen_ai.request.model": _cut(ex.model or ""),
                "gen_ai.operation.name": "chat",
            },
        )
        sc = span.context
        ex.trace_id, ex.span_id = f"{sc.trace_id:032x}", f"{sc.span_id:016x}"
        ex.trace_flags = "01" if span.recording else "00"
        ex.otel = RequestTrace(self.tracing, span)

    # ---------------------------------------------------------- from the pool

    def attempt(
        self, upstream: str, base: URL, ex: Exchange, method: str, path: str, now: float
    ) -> str:
        """A CLIENT span for one try at `upstream`; returns the traceparent to send with it."""
        self._end_attempt()
        operation = _OPERATIONS.get(path)
        attrs: dict[str, AttributeValue] = {
            "http.request.method": method,
            "server.address": base.host or "",
            "server.port": base.port or 0,
            "gen_ai.provider.name": upstream,
        }
        if operation is not None:
            attrs["gen_ai.operation.name"] = operation
        if ex.model:
            attrs["gen_ai.request.model"] = _cut(ex.model)
        name = f"{operation} {ex.model}" if operation and ex.model else method
        span = self.attempt_span = self.tracing.start_span(
            name, kind=SpanKind.CLIENT, parent=self.server.context, attributes=attrs
        )
        self._sent = now
        sc = span.context
        return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"

    def answered(self, status: int) -> None:
        """The try's answer arrived; a failed one (retried by the pool) ends its span now."""
        span = self.attempt_span
        if span is None:
            return
        span.set_attribute("http.response.status_code", status)
        if status in _FAILED_STATUS:
            span.set_attribute("error.type", str(status))
            span.set_error()
            self._end_attempt()

    def failed(self, exc: BaseException) -> None:
        """The try got no answer: error.type is what aiohttp raised (the gateway's error
        tree wraps it), e.g. `ClientConnectorError`, `TimeoutError`."""
        span = self.attempt_span
        if span is not None:
            cause = exc.__cause__ or exc
            span.set_attribute("error.type", type(cause).__qualname__)
            span.set_error()
            self._end_attempt()

    def retry(self, attempt: int, upstream: str) -> None:
        self.server.add_event("retry", {"gateway.attempt": attempt + 1, "upstream": upstream})

    def breaker_refused(self, upstream: str) -> None:
        self.server.add_event("breaker_refused", {"upstream": upstream})

    # ---------------------------------------------------------- from the relay

    def stalled(self, silent: float) -> None:
        """The heartbeat pinged the client: the upstream sent nothing for `silent` s."""
        span = self.attempt_span or self.server
        span.add_event("heartbeat_only", {"gateway.silent_seconds": round(silent, 3)})

    def streamed(self, tap: UsageTap) -> None:
        """A relayed stream ended: what its usage tap noted (parsed there anyway)."""
        self.response_id = tap.response_id
        self.response_model = tap.model
        self.finish_reason = tap.finish_reason

    def response(self, obj: Mapping[str, object]) -> None:
        """A response object or stream chunk: its id, model and first choice's finish reason
        (the relay passes what it parsed anyway; nothing else of it is kept)."""
        rid, model = obj.get("id"), obj.get("model")
        if isinstance(rid, str):
            self.response_id = rid
        if isinstance(model, str):
            self.response_model = model
        choice = first_choice(obj.get("choices"))
        if choice is not None and isinstance(reason := choice.get("finish_reason"), str):
            self.finish_reason = reason

    # ---------------------------------------------------------- the end

    def finish(self, ex: Exchange, outcome: str | None = None) -> None:
        """End the attempt in flight, then the outer span (`outcome`: a detached
        generation's own, else the exchange's)."""
        outcome = outcome or ex.outcome
        span = self.attempt_span
        usage = ex.usage
        if span is not None:
            # What the upstream said, cut here rather than on every chunk that says it.
            if self.response_id is not None:
                span.set_attribute("gen_ai.response.id", _cut(self.response_id))
            if self.response_model is not None:
                span.set_attribute("gen_ai.response.model", _cut(self.response_model))
            if self.finish_reason is not None:
                span.set_attribute("gen_ai.response.finish_reasons", (_cut(self.finish_reason),))
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            if ex.ttfb is not None and ex.ttfb >= self._sent:
                span.set_attribute("gen_ai.response.time_to_first_chunk", ex.ttfb - self._sent)
            if outcome in _FAILED_OUTCOMES:
                span.set_attribute("error.type", outcome)
                span.set_error()
            self._end_attempt()
        server = self.server
        if ex.status:
            server.set_attribute("http.response.status_code", ex.status)
        server.set_attribute("gateway.outcome", outcome)
        if outcome == "client_disconnected":
            server.add_event("client_disconnected")
        if ex.status >= 500:
            server.set_attribute("error.type", str(ex.status))
            server.set_error()
        elif not ex.status and outcome in _FAILED_OUTCOMES:  # a generation has no status
            server.set_attribute("error.type", outcome)
            server.set_error()
        server.end()

    def _end_attempt(self) -> None:
        if self.attempt_span is not None:
            self.attempt_span.end()
            self.attempt_span = None


async def tracing_ctx(app: web.Application) -> AsyncIterator[None]:
    """The export thread's lifetime: started with the app; at cleanup the last spans go out
    (bounded by SHUTDOWN_TIMEOUT, in a thread so the loop keeps serving the shutdown)."""
    tracing = app[TRACING]
    tracing.start()
    yield
    await asyncio.get_running_loop().run_in_executor(None, tracing.stop)
