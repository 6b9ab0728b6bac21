"""The span exporter (gateway/otlp.py): the SDK encoder's bytes, and OTLP/HTTP's rules for
sending them, against a real receiver on a loopback port."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from gateway.otlp import MAX_ANSWER, OTLPExporter, encode, retry_after

from .otlp_receiver import attributes

RESOURCE = Resource.create({"service.name": "gateway"})
SCOPE = InstrumentationScope("gateway")
SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _context(span_id: int, *, remote: bool = False, state: TraceState | None = None) -> SpanContext:
    return SpanContext(0x0AF7651916CD43DD8448EB211C80319C, span_id, remote, SAMPLED, state)


def _span(name: str, span_id: int, **more: Any) -> ReadableSpan:
    fields: dict[str, Any] = {
        "context": _context(span_id),
        "resource": RESOURCE,
        "instrumentation_scope": SCOPE,
        "start_time": 1_700_000_000_000_000_000 + span_id,
        "end_time": 1_700_000_000_500_000_000 + span_id,
        "kind": SpanKind.SERVER,
        "status": Status(StatusCode.UNSET),
    }
    return ReadableSpan(name, **(fields | more))


def _events() -> BoundedList:
    events = BoundedList(2)
    for i in range(3):  # one dropped
        events.append(Event("heartbeat_only", {"gateway.silent_seconds": 1.5 + i}, 7 + i))
    return events


SPANS: dict[str, list[ReadableSpan]] = {
    "a request and its tries": [
        _span(
            "chat gpt-4o",
            2,
            parent=_context(1),
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "server.address": "127.0.0.1",
                "server.port": 9000,
                "gen_ai.provider.name": "openai",
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "gpt-4o",
                "http.response.status_code": 200,
                "gen_ai.response.id": "chatcmpl-1",
                "gen_ai.response.model": "gpt-4o-2024-08-06",
                "gen_ai.response.finish_reasons": ("stop",),
                "gen_ai.usage.input_tokens": 12,
                "gen_ai.usage.output_tokens": 0,
                "gen_ai.response.time_to_first_chunk": 0.0123,
            },
        ),
        _span(
            "chat gpt-4o",
            3,
            parent=_context(1),
            kind=SpanKind.CLIENT,
            attributes={"http.response.status_code": 503, "error.type": "503"},
            status=Status(StatusCode.ERROR),
        ),
        _span(
            "POST /v1/chat/completions",
            1,
            parent=_context(9, remote=True, state=TraceState([("vendor", "x1")])),
            attributes={"http.request.method": "POST", "url.path": "/v1/chat/completions"},
            events=_events(),
            status=Status(StatusCode.ERROR, "upstream_error"),
        ),
    ],
    "a root with links and every value type": [
        _span(
            "generation gpt-4o",
            4,
            context=_context(4, state=TraceState([("a", "1"), ("b", "2")])),
            kind=SpanKind.INTERNAL,
            links=(
                Link(_context(1), {"why": "started by"}),
                Link(_context(5, remote=True)),
            ),
            attributes={
                "b": True,
                "f": -0.5,
                "i": -(2**63),
                "s": "é 🙂",
                "bytes": b"\x00\xff",
                "ints": [1, 2, 3],
                "empty": (),
                "none": None,
            },
        ),
    ],
    "no attributes, no events, no scope": [
        _span("GET /healthz", 6, instrumentation_scope=None, kind=SpanKind.PRODUCER),
        _span("x", 7, kind=SpanKind.CONSUMER, resource=Resource({}, "https://schema/1")),
    ],
}


@pytest.mark.parametrize("case", SPANS)
def test_the_bytes_are_the_sdk_encoders(case: str) -> None:
    spans = SPANS[case]
    assert encode(spans) == encode_spans(spans).SerializePartialToString()


def test_what_otlp_cannot_carry_is_left_out_and_the_rest_goes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attrs = {
        "before": "kept",
        "too big": 2**63,
        "lone surrogate": "\ud800",
        "in a list": ["ok", "\udfff"],
        "an object": object(),
        "after": 1,
    }
    span = _span("x", 1, attributes=attrs)
    with caplog.at_level(logging.CRITICAL):  # the SDK's encoder logs each one it leaves out
        assert encode([span]) == encode_spans([span]).SerializePartialToString()
    request = ExportTraceServiceRequest.FromString(encode([span]))
    (got,) = request.resource_spans[0].scope_spans[0].spans
    assert attributes(got.attributes) == {"before": "kept", "after": 1}


def test_spans_of_two_resources_each_keep_their_own() -> None:
    other = Resource.create({"service.name": "other"})
    spans = [_span("a", 1), _span("b", 2, resource=other), _span("c", 3)]
    request = ExportTraceServiceRequest.FromString(encode(spans))
    got = [
        (attributes(rs.resource.attributes)["service.name"], span.name)
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    assert got == [("gateway", "a"), ("other", "b"), ("gateway", "c")]


# ------------------------------------------------------------------ sending


@dataclass
class Collector:
    """A receiver that answers from a script: each request takes the next answer (the last
    one repeats)."""

    answers: list[Callable[[], web.StreamResponse]]
    url: str = ""
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)  # the exporter's port, request by request
    arrived: threading.Event = field(default_factory=threading.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        self.ports.append(request.transport.get_extra_info("peername")[1])
        self.got.append((dict(request.headers), await request.read()))
        self.arrived.set()
        return self.answers[min(len(self.got), len(self.answers)) - 1]()


@pytest.fixture
async def collector() -> AsyncIterator[Callable[..., Collector]]:
    servers: list[TestServer] = []

    async def make(*answers: Callable[[], web.StreamResponse]) -> Collector:
        c = Collector(list(answers))
        app = web.Application()
        app.router.add_post("/v1/traces", c.handle)
        app.router.add_post("/elsewhere", c.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        c.url = f"http://127.0.0.1:{server.port}/v1/traces"
        return c

    yield make  # type: ignore[misc]
    for server in servers:
        await server.close()


def _ok() -> web.Response:
    return web.Response(body=b"", content_type="application/x-protobuf")


def _status(status: int, **headers: str) -> Callable[[], web.Response]:
    return lambda: web.Response(status=status, headers=headers)


async def _export(exporter: OTLPExporter, spans: list[ReadableSpan]) -> SpanExportResult:
    try:
        return await asyncio.get_running_loop().run_in_executor(None, exporter.export, spans)
    finally:
        exporter.shutdown()


async def test_a_batch_is_posted_as_protobuf_with_the_collectors_headers(
    collector: Callable[..., Any],
) -> None:
    c = await collector(_ok)
    spans = SPANS["a request and its tries"]
    exporter = OTLPExporter(c.url, {"Authorization": "Bearer t0ken"}, timeout=5)
    assert await _export(exporter, spans) is SpanExportResult.SUCCESS
    ((headers, body),) = c.got
    assert headers["Content-Type"] == "application/x-protobuf"
    assert headers["Authorization"] == "Bearer t0ken"
    assert body == encode(spans)


async def test_a_busy_collector_is_tried_again_after_its_retry_after(
    collector: Callable[..., Any],
) -> None:
    busy = _status(503, **{"Retry-After": "0"})
    c = await collector(busy, busy, busy, _ok)
    exporter = OTLPExporter(c.url, {}, timeout=30)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _export(exporter, SPANS["a request and its tries"]) is SpanExportResult.SUCCESS
    # Without its Retry-After, the backoff alone would wait 1 + 2 + 4 s (less 20% at most).
    assert loop.time() - started < 2.5
    assert len(c.got) == 4
    assert c.got[0][1] == c.got[3][1]
    assert len(set(c.ports)) == 1  # each answer read to its end: one connection serves all


async def test_a_429_without_retry_after_backs_off(collector: Callable[..., Any]) -> None:
    c = await collector(_status(429), _ok)
    exporter = OTLPExporter(c.url, {}, timeout=10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _export(exporter, SPANS["a request and its tries"]) is SpanExportResult.SUCCESS
    assert loop.time() - started >= 0.8  # the first backoff: 1 s, less its 20% jitter
    assert len(c.got) == 2


@pytest.mark.parametrize("status", [400, 401, 404, 413, 500])
async def test_a_refusal_is_not_tried_again(collector: Callable[..., Any], status: int) -> None:
    c = await collector(_status(status))
    exporter = OTLPExporter(c.url, {}, timeout=10)
    assert await _export(exporter, SPANS["a request and its tries"]) is SpanExportResult.FAILURE
    assert len(c.got) == 1


async def test_a_redirect_is_not_followed_with_the_auth_header(
    collector: Callable[..., Any],
) -> None:
    c = await collector(_status(307, Location="/elsewhere"))
    exporter = OTLPExporter(c.url, {"Authorization": "Bearer t0ken"}, timeout=10)
    assert await _export(exporter, SPANS["a request and its tries"]) is SpanExportResult.FAILURE
    assert len(c.got) == 1


async def test_a_dead_collector_fails_the_batch_within_the_timeout() -> None:
    from .test_otel import _closed_port

    exporter = OTLPExporter(f"http://127.0.0.1:{_closed_port()}/v1/traces", {}, timeout=2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _export(exporter, SPANS["a request and its tries"]) is SpanExportResult.FAILURE
    # The first retry comes within 1.2 s; the next backoff (1.6 s or more) would end past
    # the 2 s budget, so the export gives up then rather than sleep past it.
    assert loop.time() - started < 2


async def test_shutdown_abandons_a_retry_and_later_batches_fail_at_once(
    collector: Callable[..., Any],
) -> None:
    c = await collector(_status(503, **{"Retry-After": "60"}))
    exporter = OTLPExporter(c.url, {}, timeout=120)
    loop = asyncio.get_running_loop()
    pending = loop.run_in_executor(None, exporter.export, SPANS["a request and its tries"])
    await loop.run_in_executor(None, c.arrived.wait, 10)
    exporter.shutdown()
    async with asyncio.timeout(10):  # not the collector's 60 s
        assert await pending is SpanExportResult.FAILURE
    assert exporter.export(SPANS["a request and its tries"]) is SpanExportResult.FAILURE
    assert len(c.got) == 1


@pytest.mark.parametrize(
    ("header", "want"),
    [("3", 3.0), ("0.5", 0.5), (None, 9.0), ("-1", 9.0), ("nan", 9.0), ("inf", 9.0),
     ("Wed, 21 Oct 2015 07:28:00 GMT", 9.0)],
)
def test_retry_after_takes_seconds_only(header: str | None, want: float) -> None:
    assert retry_after(header, 9.0) == want


async def test_an_error_no_retry_can_mend_fails_the_batch_at_once(
    collector: Callable[..., Any],
) -> None:
    c = await collector(_ok)
    tls_to_plain = c.url.replace("http://", "https://")  # the handshake meets plain HTTP
    exporter = OTLPExporter(tls_to_plain, {}, timeout=10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _export(exporter, SPANS["a request and its tries"]) is SpanExportResult.FAILURE
    assert loop.time() - started < 0.7  # not the 1 s backoff and more of a retry


async def test_the_collectors_answer_is_read_only_so_far(collector: Callable[..., Any]) -> None:
    import tracemalloc
    import zlib

    # 128 KiB on the wire (more than the exporter reads), 128 MiB inflated.
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join(packer.compress(bytes(2**20)) for _ in range(128)) + packer.flush()
    assert len(bomb) > MAX_ANSWER

    def answer() -> web.Response:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})

    c = await collector(answer, _ok)
    exporter = OTLPExporter(c.url, {}, timeout=10)
    spans = SPANS["a request and its tries"]
    loop = asyncio.get_running_loop()
    tracemalloc.start()
    try:
        assert await loop.run_in_executor(None, exporter.export, spans) is SpanExportResult.SUCCESS
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20
    # The connection it left unread is not used again: the next batch gets a clean answer.
    assert await _export(exporter, spans) is SpanExportResult.SUCCESS
    assert len(c.got) == 2
    assert c.ports[0] != c.ports[1]


async def test_an_answer_that_trickles_is_cut_at_the_timeout() -> None:
    """A collector that sends its status at once, then its body a byte at a time."""
    stop = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while not stop.is_set() and not writer.is_closing():
            writer.write(b"x")
            await writer.drain()
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except TimeoutError:
                pass
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    exporter = OTLPExporter(f"http://127.0.0.1:{port}/v1/traces", {}, timeout=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(20):
            result = await _export(exporter, SPANS["a request and its tries"])
    finally:
        stop.set()
        server.close()
        await server.wait_closed()
    assert result is SpanExportResult.SUCCESS  # its status said so; the rest is let go
    assert loop.time() - started < 2.5  # the 1 s budget, and one read's wait at most


async def test_the_content_type_is_the_exporters_whatever_the_config_says(
    collector: Callable[..., Any],
) -> None:
    c = await collector(_ok)
    exporter = OTLPExporter(c.url, {"content-type": "text/plain", "X-Team": "a"}, timeout=5)
    assert await _export(exporter, SPANS["a request and its tries"]) is SpanExportResult.SUCCESS
    ((headers, _),) = c.got
    assert [v for k, v in headers.items() if k.lower() == "content-type"] == [
        "application/x-protobuf"
    ]
    assert headers["X-Team"] == "a"


def test_a_value_that_would_recurse_forever_is_left_out() -> None:
    looped: list[Any] = []
    looped.append(looped)
    span = _span("x", 1, attributes={"looped": looped, "kept": 1})
    request = ExportTraceServiceRequest.FromString(encode([span]))
    (got,) = request.resource_spans[0].scope_spans[0].spans
    assert attributes(got.attributes) == {"kept": 1}


async def _raw_collector(
    serve: Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Any],
) -> tuple[asyncio.Server, list[int]]:
    """A TCP server whose n-th connection (from 0) is handed to `serve(n, ...)`."""
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(len(accepted))
        try:
            await serve(accepted[-1], reader, writer)
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), accepted


async def _export_to(server: asyncio.Server, scheme: str, timeout: float) -> SpanExportResult:
    port = server.sockets[0].getsockname()[1]
    exporter = OTLPExporter(f"{scheme}://127.0.0.1:{port}/v1/traces", {}, timeout=timeout)
    try:
        async with asyncio.timeout(timeout * 3):
            return await _export(exporter, SPANS["a request and its tries"])
    finally:
        server.close()
        await server.wait_closed()


async def test_a_connection_closed_before_the_answer_is_tried_again() -> None:
    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        if n > 0:  # the first is hung up on, as by a collector restarting
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    server, accepted = await _raw_collector(serve)
    assert await _export_to(server, "http", timeout=10) is SpanExportResult.SUCCESS
    assert len(accepted) == 2


async def test_a_tls_handshake_hung_up_on_is_tried_again() -> None:
    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the ClientHello's first byte: then a clean close

    server, accepted = await _raw_collector(serve)
    assert await _export_to(server, "https", timeout=2) is SpanExportResult.FAILURE
    assert len(accepted) >= 2  # not given up on after the first (about 1 s later)


async def test_an_answer_that_stalls_mid_body_is_let_go_at_the_deadline() -> None:
    """Its status and a byte of body late in the budget, then nothing: the read of the rest
    may wait only what is left, not what was left when the request went out."""

    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(1.2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nx")
        await writer.drain()
        await reader.read()  # until the exporter lets go

    server, accepted = await _raw_collector(serve)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _export_to(server, "http", timeout=1.5) is SpanExportResult.SUCCESS
    assert loop.time() - started < 2.2  # not 1.2 s + the 1.5 s the first read was given
