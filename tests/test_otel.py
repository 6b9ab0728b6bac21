"""OpenTelemetry traces, checked at a real OTLP/HTTP receiver (tests/otlp_receiver.py)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway import config
from gateway.metrics import METRICS
from gateway.otel import TRACING, Tracing
from tests.conftest import (
    Gateway,
    GatewayFactory,
    StartUpstream,
    Upstream,
    chat_body,
    make_config,
)
from tests.gateway_process import ROOT
from tests.otlp_receiver import OTLPReceiver

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
PROMPT = "a secret prompt 7f3a"
WORDS = ["Hello", " from", " upstream", " 9c1e"]
SEEN = web.AppKey("seen", list[str])
USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


def _chunk(**fields: Any) -> bytes:
    base = {"id": "chatcmpl-abc123", "object": "chat.completion.chunk", "model": "gpt-4o-2024"}
    return b"data: " + orjson.dumps({**base, **fields}) + b"\n\n"


@pytest.fixture
async def flaky(start_upstream: StartUpstream) -> Upstream:
    """503 to the first try, then a stream with OpenAI's usage chunk; records traceparents."""
    seen: list[str] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("traceparent", ""))
        await request.read()
        if len(seen) == 1:
            return web.json_response(
                {"error": {"message": "busy", "type": "server_error"}}, status=503
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk(choices=[{"index": 0, "delta": {"role": "assistant"}}]))
        for w in WORDS:
            await resp.write(_chunk(choices=[{"index": 0, "delta": {"content": w}}], usage=None))
        await resp.write(_chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        await resp.write(_chunk(choices=[], usage=USAGE))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app[SEEN] = seen
    return await start_upstream(app)



def _lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(x) for x in buf.getvalue().splitlines() if x.startswith("{")]


async def _flush(gw: Gateway) -> None:
    await asyncio.to_thread(gw.app[TRACING].flush)


def _traced(receiver: OTLPReceiver, **more: Any) -> dict[str, Any]:
    return {
        "tracing": {"endpoint": receiver.url, "service_name": "gw-test", **more},
        "retry": {"attempts": 3, "backoff_initial": 0, "backoff_max": 0},
    }


async def test_a_retried_stream_exports_one_server_span_and_a_client_span_per_attempt(
    gateway_factory: GatewayFactory,
    flaky: Upstream,
    otlp_receiver: OTLPReceiver,
    http: aiohttp.ClientSession,
    captured: io.StringIO,
) -> None:
    gw = await gateway_factory(flaky.url, **_traced(otlp_receiver))
    body = chat_body(messages=[{"role": "user", "content": PROMPT}], model="gpt-4o")
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
    async with http.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as r:
        text = await r.text()
        assert r.status == 200
    assert "[DONE]" in text and "9c1e" in text
    await _flush(gw)
    spans = await otlp_receiver.wait_spans(3)
    assert len(spans) == 3
    (server,) = [s for s in spans if s.span.kind == s.span.SPAN_KIND_SERVER]
    clients = sorted(
        (s for s in spans if s.span.kind == s.span.SPAN_KIND_CLIENT),
        key=lambda s: s.span.start_time_unix_nano,
    )
    assert len(clients) == 2
    # The SERVER span continues the caller's trace, with the ids of the request's log lines.
    assert server.service == "gw-test"
    assert (server.trace_id, server.parent_id) == (TRACE, PARENT)
    access = [x for x in _lines(captured) if x.get("event") == "access"][-1]
    assert (access["trace_id"], access["span_id"]) == (TRACE, server.span_id)
    assert server.name == "POST /v1/chat/completions"
    assert server.attrs["http.request.method"] == "POST"
    assert server.attrs["http.route"] == "/v1/chat/completions"
    assert server.attrs["http.response.status_code"] == 200
    assert server.attrs["client.address"] == "127.0.0.1"
    assert server.events()["retry"]["gateway.attempt"] == 2
    # Each try is a CLIENT child of it, and the traceparent that try sent names it.
    port = flaky.server.port
    for c, sent in zip(clients, flaky.server.app[SEEN], strict=True):
        assert c.trace_id == TRACE and c.parent_id == server.span_id
        assert sent == f"00-{TRACE}-{c.span_id}-01"
        assert c.name == "chat gpt-4o"
        assert c.attrs["gen_ai.operation.name"] == "chat"
        assert c.attrs["gen_ai.provider.name"] == "mock"
        assert c.attrs["gen_ai.request.model"] == "gpt-4o"
        assert (c.attrs["server.address"], c.attrs["server.port"]) == ("127.0.0.1", port)
    first, second = clients
    assert first.attrs["http.response.status_code"] == 503
    assert first.attrs["error.type"] == "503"
    assert first.span.status.code == first.span.status.STATUS_CODE_ERROR
    assert "error.type" not in second.attrs
    assert second.attrs["gen_ai.response.model"] == "gpt-4o-2024"
    assert second.attrs["gen_ai.response.id"] == "chatcmpl-abc123"
    assert second.attrs["gen_ai.response.finish_reasons"] == ["stop"]
    # Usage as the upstream counted it.
    assert second.attrs["gen_ai.usage.input_tokens"] == USAGE["prompt_tokens"]
    assert second.attrs["gen_ai.usage.output_tokens"] == USAGE["completion_tokens"]
    assert 0 < second.attrs["gen_ai.response.time_to_first_chunk"] < 30
    # Never a prompt or a completion.
    everything = repr([(s.name, s.attrs, s.events()) for s in spans])
    assert PROMPT not in everything and "9c1e" not in everything


async def test_an_unsampled_caller_is_followed_and_nothing_is_exported(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    otlp_receiver: OTLPReceiver,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(upstream.url, **_traced(otlp_receiver))
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-00"}
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(), headers=headers) as r:
        await r.read()
    sent = upstream.state.last_headers["traceparent"]
    assert sent.startswith(f"00-{TRACE}-") and sent.endswith("-00")
    # A sampled request afterwards is exported alone: the unsampled one never was.
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as r:
        await r.read()
    await _flush(gw)
    spans = await otlp_receiver.wait_spans(2)
    await _flush(gw)
    assert len(spans) == 2 and TRACE not in {s.trace_id for s in spans}


async def test_sample_ratio_zero_exports_no_root_trace(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    otlp_receiver: OTLPReceiver,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(upstream.url, **_traced(otlp_receiver, sample_ratio=0.0))
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as r:
        await r.read()
    assert upstream.state.last_headers["traceparent"].endswith("-00")
    # ... but a sampled caller is always followed.
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(), headers=headers) as r:
        await r.read()
    await _flush(gw)
    spans = await otlp_receiver.wait_spans(2)
    assert {s.trace_id for s in spans} == {TRACE}


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_a_root_is_sampled_as_the_sdks_ratio_sampler_decides(ratio: float) -> None:
    import random

    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
    from prometheus_client import CollectorRegistry, Counter

    cfg = config.TracingConfig(endpoint="http://127.0.0.1:9/v1/traces", sample_ratio=ratio)
    tracing = Tracing(cfg, Counter("d", "", registry=CollectorRegistry()))
    sdk = TraceIdRatioBased(ratio)
    seen = set()
    edges = [2**64, 2**64 + sdk.bound, 2**64 + max(sdk.bound - 1, 0), 2**128 - 1]
    for trace_id in [random.getrandbits(128) for _ in range(2000)] + edges:
        ours = tracing.start_span("x", trace_id=trace_id).recording
        decision = sdk.should_sample(None, trace_id, "x").decision
        assert ours == (decision is Decision.RECORD_AND_SAMPLE), hex(trace_id)
        seen.add(ours)
    assert seen == ({True, False} if 0 < ratio < 1 else {ratio == 1.0})


async def test_the_collectors_auth_headers_are_sent(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    otlp_receiver: OTLPReceiver,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(
        upstream.url, **_traced(otlp_receiver, headers={"x-collector-token": "t0k3n"})
    )
    async with http.get(f"{gw.url}/healthz") as r:
        assert r.status == 200
    await _flush(gw)
    await otlp_receiver.wait_spans(1)
    assert otlp_receiver.headers[0]["x-collector-token"] == "t0k3n"


async def test_a_detached_generation_has_its_own_span_linked_to_the_request(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    otlp_receiver: OTLPReceiver,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(upstream.url, **_traced(otlp_receiver))
    async with http.post(f"{gw.url}/v1/streams", json=chat_body()) as r:
        assert r.status == 201
        url = (await r.json())["url"]
    async with http.get(f"{gw.url}{url}") as r:
        assert "done" in await r.text()
    # The generation ends its span just after its last event: wait for it.
    async with asyncio.timeout(30):
        while True:
            await _flush(gw)
            names = [s.name for s in otlp_receiver.spans]
            if "generation mock-gpt" in names:
                break
            await asyncio.sleep(0.05)
    by_name = {s.name: s for s in otlp_receiver.spans}
    post = by_name["POST /v1/streams"]
    gen = by_name["generation mock-gpt"]
    assert gen.trace_id != post.trace_id and gen.parent_id == ""
    (link,) = gen.span.links
    assert (link.trace_id.hex(), link.span_id.hex()) == (post.trace_id, post.span_id)
    attempt = by_name["chat mock-gpt"]
    assert attempt.parent_id == gen.span_id
    assert attempt.attrs["gen_ai.usage.output_tokens"] > 0
    assert gen.attrs["gateway.outcome"] == "completed"


async def test_the_heartbeat_over_a_silent_upstream_is_an_event(
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    otlp_receiver: OTLPReceiver,
    http: aiohttp.ClientSession,
) -> None:
    go = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk(choices=[{"index": 0, "delta": {"role": "assistant"}}]))
        await go.wait()
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    up = await start_upstream(app)
    gw = await gateway_factory(
        up.url, sse={"heartbeat_interval": 0.05}, **_traced(otlp_receiver)
    )
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as r:
        async with asyncio.timeout(30):
            while b": ping" not in await r.content.readline():
                pass
        go.set()
        await r.read()
    await _flush(gw)
    spans = await otlp_receiver.wait_spans(2)
    (client,) = [s for s in spans if s.span.kind == s.span.SPAN_KIND_CLIENT]
    assert client.events()["heartbeat_only"]["gateway.silent_seconds"] >= 0.04


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _timed_streams(http: aiohttp.ClientSession, gw: Gateway, n: int) -> list[float]:
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as r:
            assert r.status == 200
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
        took.append(time.perf_counter() - t0)
    return took


async def test_a_dead_collector_changes_no_status_and_no_latency(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    captured: io.StringIO,
) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}/v1/traces"
    off = await gateway_factory(upstream.url)
    on = await gateway_factory(upstream.url, tracing={"endpoint": dead})
    await _timed_streams(http, off, 5)
    await _timed_streams(http, on, 5)  # warm both
    t_off, t_on = [], []
    for _ in range(4):  # interleaved, so load from elsewhere hits both alike
        t_off += await _timed_streams(http, off, 10)
        t_on += await _timed_streams(http, on, 10)
        await _flush(on)  # the exports fail meanwhile, in their own thread
    med_off, med_on = statistics.median(t_off), statistics.median(t_on)
    # Noise on a shared machine, not a blocked loop (that would cost seconds).
    assert med_on <= med_off * 2 + 0.02, (med_off, med_on)
    dropped = on.app[METRICS].registry.get_sample_value("gateway_trace_spans_dropped_total")
    assert dropped is not None and dropped > 0
    states = [x for x in _lines(captured) if x.get("event", "").startswith("collector_")]
    assert [x["event"] for x in states] == ["collector_unreachable"]


def test_a_full_queue_drops_and_counts_and_the_state_is_logged_per_change(
    captured: io.StringIO,
) -> None:
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import CollectorRegistry, Counter

    class Switch(InMemorySpanExporter):
        ok = False

        def export(self, spans: Any) -> SpanExportResult:
            super().export(spans)
            return SpanExportResult.SUCCESS if self.ok else SpanExportResult.FAILURE

    exporter = Switch()
    dropped = Counter("dropped", "", registry=CollectorRegistry())
    cfg = config.TracingConfig(endpoint="http://127.0.0.1:9/v1/traces")
    tracing = Tracing(cfg, dropped, max_queue=4, exporter=exporter)
    tracing.start()
    try:
        for _ in range(10):  # faster than the export thread's 1 s schedule
            tracing.start_span("x").end()
        assert dropped._value.get() == 6  # type: ignore[attr-defined]
        tracing.flush()  # 4 fail at the collector: dropped too
        assert dropped._value.get() == 10  # type: ignore[attr-defined]
        tracing.start_span("y").end()
        tracing.flush()
        exporter.ok = True
        for _ in range(3):
            tracing.start_span("z").end()
            tracing.flush()
    finally:
        tracing.stop()
    assert dropped._value.get() == 11  # type: ignore[attr-defined]
    states = [x["event"] for x in _lines(captured) if x.get("event", "").startswith("collector_")]
    assert states == ["collector_unreachable", "collector_reachable"]


@pytest.mark.parametrize(
    "module", ["opentelemetry.sdk.trace", "opentelemetry.proto.trace.v1.trace_pb2", "urllib3"]
)
def test_an_endpoint_without_the_otel_extra_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(config.ConfigError) as err:
        make_config("http://127.0.0.1:1/v1", tracing={"endpoint": "http://127.0.0.1:4318/v1/traces"})
    assert "pip install 'gateway[otel]'" in str(err.value)
    assert str(err.value).startswith("tracing.endpoint:")
    # Off, the extra is not needed at all.
    make_config("http://127.0.0.1:1/v1", tracing={"endpoint": ""})


@pytest.mark.parametrize(
    ("tracing", "problem"),
    [
        ({"endpoint": "ftp://x/v1/traces"}, "tracing.endpoint: 'ftp://x/v1/traces' is not"),
        ({"sample_ratio": 1.5}, "tracing.sample_ratio: must be from 0.0 to 1.0"),
        ({"headers": ["a"]}, "tracing.headers: must be a table of strings"),
        ({"headers": {"a b": "x"}}, "tracing.headers: 'a b' is not a header name"),
        (
            {"headers": {"authorization": "Bearer t\u20acken"}},
            "tracing.headers: the value of 'authorization' is not printable ASCII",
        ),
        (
            {"headers": {"Content-Length": "5"}},
            "tracing.headers: 'Content-Length' is the exporter's to send",
        ),
        ({"headers": {"host": "x"}}, "tracing.headers: 'host' is the exporter's to send"),
        ({"service": "x"}, "tracing.service: unknown key"),
    ],
)
def test_bad_tracing_config_is_refused(tracing: dict[str, Any], problem: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        make_config("http://127.0.0.1:1/v1", tracing=tracing)
    assert problem in str(err.value)


def test_a_header_table_is_parsed_with_interpolation() -> None:
    text = (
        '[tracing]\nendpoint = "http://127.0.0.1:4318/v1/traces"\n'
        'headers = { authorization = "Bearer ${OTEL_TOKEN}" }\n'
        '[[upstreams]]\nname = "a"\nbase_url = "http://127.0.0.1:1/v1"\n'
    )
    cfg = config.parse(text, env={"OTEL_TOKEN": "abc"})
    assert cfg.tracing.headers == (("authorization", "Bearer abc"),)
    bad = text.replace("authorization", '"bad header"')
    with pytest.raises(config.ConfigError, match="is not a header name"):
        config.parse(bad, env={"OTEL_TOKEN": "abc"})


def test_with_tracing_off_no_opentelemetry_is_imported_and_no_span_made() -> None:
    """Off costs nothing: the tracing SDK (so its Span class) is not even imported while
    requests are served; every hook is an `is None` test."""
    script = """
import asyncio, sys
import aiohttp
from aiohttp.test_utils import TestServer
from gateway.app import create_app
from gateway.mock_upstream import MockSettings, create_mock_app
from gateway.process.server import start
from tests.conftest import chat_body, make_config

async def main():
    up = TestServer(create_mock_app(MockSettings(chunks=3, delay=0)), host="127.0.0.1")
    await up.start_server()
    app = create_app(make_config(f"http://127.0.0.1:{up.port}/v1"))
    runner, port = await start(app, "127.0.0.1", 0, shutdown_timeout=1)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 json=chat_body()) as r:
                assert r.status == 200, r.status
                await r.read()
    await runner.cleanup()
    await up.close()
    # (redis-py imports parts of OpenTelemetry's metrics SDK on its own, when installed.)
    print(sorted(m for m in ("gateway.otel", "opentelemetry.sdk.trace") if m in sys.modules))

asyncio.run(main())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


async def test_a_dead_upstream_gives_an_error_type_then_a_breaker_refusal_event(
    gateway_factory: GatewayFactory,
    otlp_receiver: OTLPReceiver,
    http: aiohttp.ClientSession,
) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    gw = await gateway_factory(
        dead,
        breaker={"failure_threshold": 1, "cooldown": 600},
        **{**_traced(otlp_receiver), "retry": {"attempts": 1}},
    )
    for status in (502, 503):
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as r:
            assert r.status == status
    await _flush(gw)
    spans = await otlp_receiver.wait_spans(3)
    servers = sorted(
        (s for s in spans if s.span.kind == s.span.SPAN_KIND_SERVER),
        key=lambda s: s.span.start_time_unix_nano,
    )
    (client,) = [s for s in spans if s.span.kind == s.span.SPAN_KIND_CLIENT]
    assert client.parent_id == servers[0].span_id
    assert client.attrs["error.type"] == "ClientConnectorError"
    assert servers[0].attrs["error.type"] == "502"
    assert servers[1].events()["breaker_refused"]["upstream"] == "mock"
    assert servers[1].attrs["http.response.status_code"] == 503


async def test_a_huge_model_name_is_cut_in_spans(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    otlp_receiver: OTLPReceiver,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(upstream.url, **_traced(otlp_receiver))
    model = "m" * 20000
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(model=model)) as r:
        await r.read()
    await _flush(gw)
    spans = await otlp_receiver.wait_spans(2)
    (client,) = [s for s in spans if s.span.kind == s.span.SPAN_KIND_CLIENT]
    assert client.attrs["gen_ai.request.model"] == "m" * 256
    assert client.attrs["gen_ai.response.model"] == "m" * 256  # the upstream's echo
    assert len(client.name) < 300


async def test_a_detached_generation_follows_an_unsampled_request(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    otlp_receiver: OTLPReceiver,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(upstream.url, **_traced(otlp_receiver))
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-00"}
    async with http.post(f"{gw.url}/v1/streams", json=chat_body(), headers=headers) as r:
        url = (await r.json())["url"]
    async with http.get(f"{gw.url}{url}") as r:
        assert "done" in await r.text()
    assert upstream.state.last_headers["traceparent"].endswith("-00")
    async with http.get(f"{gw.url}/healthz") as r:  # a sampled request, as a marker
        await r.read()
    await _flush(gw)
    await otlp_receiver.wait_spans(1)
    await _flush(gw)
    # Only the reader's GET (a trace of its own) and the marker: no POST, no generation.
    names = sorted(s.name for s in otlp_receiver.spans)
    assert names == ["GET /healthz", "GET /v1/streams/{id}"]


async def test_a_detached_streams_id_is_not_exported_in_spans(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    otlp_receiver: OTLPReceiver,
    http: aiohttp.ClientSession,
) -> None:
    # The id is the only credential GET and DELETE /v1/streams/{id} ask for: the access
    # line keeps a prefix of it, and the SERVER span's url.path had it whole, exported to
    # the collector (often another party's).
    gw = await gateway_factory(upstream.url, **_traced(otlp_receiver))
    async with http.post(f"{gw.url}/v1/streams", json=chat_body()) as r:
        assert r.status == 201
        url = (await r.json())["url"]
    stream_id = url.rsplit("/", 1)[1]
    async with http.get(f"{gw.url}{url}") as r:
        assert "done" in await r.text()
    async with asyncio.timeout(30):
        while not any(s.name == "GET /v1/streams/{id}" for s in otlp_receiver.spans):
            await _flush(gw)
            await asyncio.sleep(0.05)
    (get,) = [s for s in otlp_receiver.spans if s.name == "GET /v1/streams/{id}"]
    assert get.attrs["url.path"].startswith("/v1/streams/")
    for span in otlp_receiver.spans:
        assert stream_id not in json.dumps(span.attrs, default=str), span.name


def test_a_span_keeps_its_latest_events_and_counts_the_dropped() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import CollectorRegistry, Counter

    from gateway.otel import MAX_EVENTS

    exporter = InMemorySpanExporter()
    cfg = config.TracingConfig(endpoint="http://127.0.0.1:9/v1/traces")
    tracing = Tracing(cfg, Counter("d", "", registry=CollectorRegistry()), exporter=exporter)
    tracing.start()
    try:
        span = tracing.start_span("stalled")
        for i in range(MAX_EVENTS + 2):
            span.add_event("heartbeat_only", {"n": i})
        span.end()
        tracing.flush()
    finally:
        tracing.stop()
    (exported,) = exporter.get_finished_spans()
    assert len(exported.events) == MAX_EVENTS
    assert exported.events[-1].attributes == {"n": MAX_EVENTS + 1}  # the latest are kept
    assert exported.dropped_events == 2
