"""OpenTelemetry traces over OTLP/HTTP, when `[tracing].endpoint` is set.

One trace per request, laid out as an operator reads it:

    SERVER  "POST /v1/chat/completions"      the request, ids = the access line's
      CLIENT  "chat gpt-4o" (attempt 1)      one per upstream try; its id is the
      CLIENT  "chat gpt-4o" (attempt 2)      traceparent that try sent upstream

A detached generation (POST /v1/streams) gets a span of its own in a trace of its own,
linked to the request that started it: it outlives that request.

Off (no endpoint), nothing of this module is imported: `Exchange.otel` stays None and every
hook is one `is None` test. On, export never touches traffic: spans are queued for the SDK's
`BatchSpanProcessor` thread behind a bound (a span that does not fit is dropped and counted
in `gateway_trace_spans_dropped_total`, as are spans the collector did not take), and the
collector's state is logged once per change (`collector_unreachable`, `collector_reachable`).

Attributes follow the HTTP and GenAI semantic conventions; never a prompt or completion text.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes
from yarl import URL

from .config import TracingConfig
from .logs import loggable_path
from .state import CLIENT_IP
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


class _PresetIds(IdGenerator):
    """The tracing middleware chose the request's trace and span ids before any span (its
    log lines carry them): the SERVER span takes those, set here just before it starts;
    every other span gets random ones."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self.trace_id = 0
        self.span_id = 0

    def generate_trace_id(self) -> int:
        tid, self.trace_id = self.trace_id, 0
        return tid or self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        sid, self.span_id = self.span_id, 0
        return sid or self._random.generate_span_id()


class _RatioOrLinked(Sampler):
    """Root spans: sampled at `ratio`; a root linked to another span (a detached generation,
    linked to the request that started it) follows that span's decision instead."""

    def __init__(self, ratio: float) -> None:
        self._ratio = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if links:
            sampled = any(link.context.trace_flags.sampled for link in links)
            return SamplingResult(Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP)
        return self._ratio.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"RatioOrLinked{{{self._ratio.rate}}}"


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
            max_export_batch_size=min(512, max_queue),
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
        self._ids = _PresetIds()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name}),
            sampler=ParentBased(_RatioOrLinked(cfg.sample_ratio)),
            id_generator=self._ids,
            span_limits=SpanLimits(max_span_attribute_length=MAX_VALUE),
            shutdown_on_exit=False,
        )
        self.tracer = self.provider.get_tracer("gateway")
        self._dropped = dropped
        self._max_queue = max_queue
        self._exporter = exporter or OTLPSpanExporter(
            endpoint=cfg.endpoint, headers=dict(cfg.headers), timeout=EXPORT_TIMEOUT
        )
        self.watched: _WatchedExporter | None = None
        self._processor: _BoundedBatch | None = None

    def start(self) -> None:
        """Start the export thread (a processor added later sees only later spans)."""
        # The exporter's own lines say the same thing once per failed batch: ours say it
        # once per change of the collector's state.
        logging.getLogger("opentelemetry.exporter").setLevel(logging.CRITICAL)
        logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.CRITICAL)
        self.watched = _WatchedExporter(self._exporter, self._dropped, self.cfg.endpoint)
        self._processor = _BoundedBatch(self.watched, self._max_queue, self._dropped)
        self.provider.add_span_processor(self._processor)

    def stop(self) -> None:
        """Blocking (run it in a thread): the last spans go out, within SHUTDOWN_TIMEOUT."""
        if self._processor is not None:
            self._processor.shutdown()

    def flush(self) -> bool:
        """Blocking: export what is queued now (tests, and a stop with time left)."""
        return self._processor.force_flush() if self._processor is not None else True

    # ------------------------------------------------------------------ spans

    def request(self, request: web.Request, ex: Exchange) -> None:
        """The tracing middleware's hook: the SERVER span, with the exchange's own ids,
        child of the incoming traceparent the middleware continued (`ex.parent_id`)."""
        parent = Context()
        if ex.parent_id is not None:
            parent = trace.set_span_in_context(
                trace.NonRecordingSpan(
                    trace.SpanContext(
                        int(ex.trace_id, 16),
                        int(ex.parent_id, 16),
                        is_remote=True,
                        trace_flags=trace.TraceFlags(int(ex.trace_flags, 16)),
                    )
                )
            )
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        # A detached stream's id is its credential: cut to a prefix, as the access line does.
        path = loggable_path(request.path)
        attrs: dict[str, str] = {"http.request.method": request.method, "url.path": path}
        if route is not None:
            attrs["http.route"] = route
        self._ids.trace_id, self._ids.span_id = int(ex.trace_id, 16), int(ex.span_id, 16)
        span = self.tracer.start_span(
            f"{request.method} {route}" if route else request.method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attrs,
        )
        self._ids.trace_id = self._ids.span_id = 0
        ex.trace_flags = "01" if span.get_span_context().trace_flags.sampled else "00"
        ex.otel = RequestTrace(self.tracer, span)

    def finished(self, request: web.Request, ex: Exchange, now: float) -> None:
        """The app's finish hook (`state.FINISHED`): close the request's spans."""
        t = ex.otel
        if t is None:
            return
        if isinstance(t, RequestTrace):
            address = request.get(CLIENT_IP) or request.remote or ""
            t.server.set_attribute("client.address", address)
        t.finish(ex)


class RequestTrace:
    """One request's (or one detached generation's) spans: the outer span and the upstream
    attempt in flight. The pool and the relay call it through `Exchange.otel`."""

    __slots__ = (
        "_ctx",
        "_sent",
        "attempt_span",
        "finish_reason",
        "response_id",
        "response_model",
        "server",
        "tracer",
    )

    def __init__(self, tracer: trace.Tracer, server: trace.Span) -> None:
        self.tracer = tracer
        self.server = server
        self._ctx = trace.set_span_in_context(server)
        self.attempt_span: trace.Span | None = None
        self._sent = 0.0
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.finish_reason: str | None = None

    def detached(self, ex: Exchange) -> None:
        """A detached generation started by this request: a span in a trace of its own (it
        outlives the request), linked to this request's SERVER span and sampled with it.
        `ex`, the generation's own exchange, takes that trace's ids."""
        span = self.tracer.start_span(
            f"generation {(ex.model or '')[:MAX_VALUE]}",
            context=Context(),
            kind=SpanKind.INTERNAL,
            links=[Link(self.server.get_span_context())],
            attributes={"gen_ai.request.model": ex.model or "", "gen_ai.operation.name": "chat"},
        )
        sc = span.get_span_context()
        ex.trace_id, ex.span_id = f"{sc.trace_id:032x}", f"{sc.span_id:016x}"
        ex.trace_flags = "01" if sc.trace_flags.sampled else "00"
        ex.otel = RequestTrace(self.tracer, span)

    # ---------------------------------------------------------- from the pool

    def attempt(
        self, upstream: str, base: URL, ex: Exchange, method: str, path: str, now: float
    ) -> str:
        """A CLIENT span for one try at `upstream`; returns the traceparent to send with it."""
        self._end_attempt()
        operation = _OPERATIONS.get(path)
        attrs: dict[str, str | int] = {
            "http.request.method": method,
            "server.address": base.host or "",
            "server.port": base.port or 0,
            "gen_ai.provider.name": upstream,
            "gateway.attempt": ex.attempts,
        }
        if operation is not None:
            attrs["gen_ai.operation.name"] = operation
        if ex.model:
            attrs["gen_ai.request.model"] = ex.model
        name = f"{operation} {ex.model[:MAX_VALUE]}" if operation and ex.model else method
        span = self.attempt_span = self.tracer.start_span(
            name, context=self._ctx, kind=SpanKind.CLIENT, attributes=attrs
        )
        self._sent = now
        sc = span.get_span_context()
        return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"

    def answered(self, status: int) -> None:
        """The try's answer arrived; a failed one (retried by the pool) ends its span now."""
        span = self.attempt_span
        if span is None:
            return
        span.set_attribute("http.response.status_code", status)
        if status in _FAILED_STATUS:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))
            self._end_attempt()

    def failed(self, exc: BaseException) -> None:
        """The try got no answer: error.type is what aiohttp raised (the gateway's error
        tree wraps it), e.g. `ClientConnectorError`, `TimeoutError`."""
        span = self.attempt_span
        if span is not None:
            cause = exc.__cause__ or exc
            span.set_attribute("error.type", type(cause).__qualname__)
            span.set_status(Status(StatusCode.ERROR))
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
            if self.response_id is not None:
                span.set_attribute("gen_ai.response.id", self.response_id)
            if self.response_model is not None:
                span.set_attribute("gen_ai.response.model", self.response_model)
            if self.finish_reason is not None:
                span.set_attribute("gen_ai.response.finish_reasons", (self.finish_reason,))
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            if ex.ttfb is not None and ex.ttfb >= self._sent:
                span.set_attribute("gen_ai.response.time_to_first_chunk", ex.ttfb - self._sent)
            if outcome in _FAILED_OUTCOMES:
                span.set_attribute("error.type", outcome)
                span.set_status(Status(StatusCode.ERROR))
            self._end_attempt()
        server = self.server
        if ex.status:
            server.set_attribute("http.response.status_code", ex.status)
        server.set_attribute("gateway.outcome", outcome)
        if ex.upstream is not None:
            server.set_attribute("gateway.upstream", ex.upstream)
        if outcome == "client_disconnected":
            server.add_event("client_disconnected")
        if ex.status >= 500:
            server.set_attribute("error.type", str(ex.status))
            server.set_status(Status(StatusCode.ERROR))
        elif not ex.status and outcome in _FAILED_OUTCOMES:  # a generation has no status
            server.set_attribute("error.type", outcome)
            server.set_status(Status(StatusCode.ERROR))
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
