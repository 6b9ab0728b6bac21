"""The floor under the gateway: a bare aiohttp relay with nothing of the gateway in it.

One `aiohttp.web` server on uvloop, one shared `ClientSession`, no middleware, no access
log, no auth, no limits, no metrics, no timeouts, no SSE parsing: the request body goes to
the upstream and each read of the answer is written back as it is. What this costs is what
aiohttp's server and client cost per request and per chunk, so `make bench` can show how
much of the gateway's figure is the framework and how much is the gateway.

    python -m tests.bench.floor --port P --upstream http://127.0.0.1:U
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
PASS = ("Content-Type", "x-mock-chunks", "x-mock-delay")


async def relay(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k in PASS if (v := request.headers.get(k)) is not None}
    body = await request.read()
    url = request.app[UPSTREAM] + request.path
    async with request.app[SESSION].post(url, data=body, headers=headers) as resp:
        if resp.content_type != "text/event-stream":
            return web.Response(
                status=resp.status, body=await resp.read(), content_type=resp.content_type
            )
        out = web.StreamResponse(
            status=resp.status,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await out.prepare(request)
        while data := await resp.content.readany():
            await out.write(data)
        await out.write_eof()
        return out


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        timeout = aiohttp.ClientTimeout(total=None)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as s:
            app[SESSION] = s
            yield

    app.cleanup_ctx.append(session)
    app.router.add_post("/{tail:.*}", relay)
    return app


async def serve(port: int, upstream: str) -> None:
    runner = web.AppRunner(make_app(upstream), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    try:
        await asyncio.Event().wait()  # until the bench terminates the process
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
