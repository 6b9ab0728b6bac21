"""A real OTLP/HTTP trace receiver on a loopback port, decoding with `opentelemetry-proto`.

The fixture `otlp_receiver` answers `POST /v1/traces` as a collector does and keeps every
span it got, with its attributes decoded to plain Python values.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


@dataclass
class Received:
    span: Span
    service: str
    attrs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    def events(self) -> dict[str, dict[str, Any]]:
        return {e.name: attributes(e.attributes) for e in self.span.events}


@dataclass
class OTLPReceiver:
    url: str = ""
    spans: list[Received] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(body)
        self.headers.append(dict(request.headers))
        for rs in msg.resource_spans:
            service = attributes(rs.resource.attributes).get("service.name", "")
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.spans.append(Received(span, service, attributes(span.attributes)))
        self.changed.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def wait_spans(self, n: int, timeout: float = 30.0) -> list[Received]:
        async with asyncio.timeout(timeout):
            while len(self.spans) < n:
                self.changed.clear()
                await self.changed.wait()
        return self.spans


@pytest.fixture
async def otlp_receiver() -> AsyncIterator[OTLPReceiver]:
    receiver = OTLPReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    receiver.url = f"http://127.0.0.1:{server.port}/v1/traces"
    yield receiver
    await server.close()
