"""A fault-injecting upstream for the resilience tests: it answers from a script.

Each request takes the next step of the script (a status, optionally with Retry-After);
when the script runs out it answers 200. A 200 is a small chat completion: SSE with a usage
chunk when the request asked to stream, else JSON with `usage`. It records when every request
arrived and how many are in flight, and can hold its answers until a test releases them.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

import orjson
from aiohttp import web

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


@dataclass
class Step:
    status: int = 200
    retry_after: str | None = None


@dataclass
class Faulty:
    script: list[Step] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # loop.time() of each request
    in_flight: int = 0
    max_in_flight: int = 0
    hold: asyncio.Event | None = None  # when set up, every answer waits for it
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def requests(self) -> int:
        return len(self.arrivals)

    def app(self) -> web.Application:
        app = web.Application(handler_args={"handler_cancellation": True})
        app.router.add_post("/v1/chat/completions", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(asyncio.get_running_loop().time())
        self.arrived.set()
        body = await request.json()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            step = self.script.pop(0) if self.script else Step()
            if step.status != 200:
                headers = {"Retry-After": step.retry_after} if step.retry_after else {}
                err = {
                    "error": {"message": f"scripted {step.status}", "type": "x", "code": "scripted"}
                }
                return web.json_response(err, status=step.status, headers=headers)
            if body.get("stream"):
                return await _stream(request)
            return web.json_response(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "a b c"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": USAGE,
                }
            )
        finally:
            self.in_flight -= 1


async def _stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for word in ("a", "b", "c"):
        chunk = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    await resp.write(b"data: " + orjson.dumps(last) + b"\n\n")
    await resp.write(b"data: " + orjson.dumps({"choices": [], "usage": USAGE}) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def dead_url() -> str:
    """A loopback base_url nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
