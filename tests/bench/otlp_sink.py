"""The benchmark's trace collector: takes OTLP/HTTP exports, counts spans, answers 200.

It decodes each export with opentelemetry-proto (as a collector would pay to), so the bench
knows the gateway's spans arrived; its own CPU is not the gateway's and is not counted.

    python -m tests.bench.otlp_sink --port 0 --port-file PATH
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

SPANS = web.AppKey("spans", list[int])
_OK = ExportTraceServiceResponse().SerializeToString()


async def traces(request: web.Request) -> web.Response:
    msg = ExportTraceServiceRequest()
    msg.ParseFromString(await request.read())
    request.app[SPANS][0] += sum(
        len(ss.spans) for rs in msg.resource_spans for ss in rs.scope_spans
    )
    return web.Response(body=_OK, content_type="application/x-protobuf")


async def count(request: web.Request) -> web.Response:
    return web.Response(text=str(request.app[SPANS][0]))


async def main(port: int, port_file: str | None) -> None:
    app = web.Application(client_max_size=64 << 20)
    app[SPANS] = [0]
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/spans", count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    if port_file:
        Path(port_file).write_text(str(bound))
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file")
    args = parser.parse_args()
    try:
        asyncio.run(main(args.port, args.port_file))
    except KeyboardInterrupt:
        pass
