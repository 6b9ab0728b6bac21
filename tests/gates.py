"""An upstream whose streams are held open, and the helpers the limit tests share.

`Gates` answers a stream with one chunk, then waits for the gate named by the request's
`x-gate` header before it ends: a test decides when each stream finishes, so concurrency
slots can be held and let go on cue. A non-stream request gets JSON with usage at once.
The `gates` fixture (a pytest plugin of conftest's) starts one on a loopback port.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import TEST_KEY, TEST_KEY_SHA, StartUpstream, Upstream, chat_body

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk",'
    b'"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
)
END = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\ndata: [DONE]\n\n'
)


def key(**limits: Any) -> list[dict[str, Any]]:
    """The test key's [[auth.keys]] entry, unlimited but for `limits`."""
    return [{"client": "tester", "sha256": TEST_KEY_SHA, "rpm": 0, "max_concurrent": 0, **limits}]


async def until(pred: Callable[[], Any], timeout: float = 10.0, every: float = 0.02) -> float:
    """Poll `pred` (sync or async) until true, for state another task or process changes
    with no event to await (a finally block, a lease expiring); returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        got = pred()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return loop.time() - start
        assert loop.time() - start < timeout, "condition never held"
        await asyncio.sleep(every)


class Gates:
    """Upstream streams that send one chunk, then wait for their gate (x-gate header)."""

    def __init__(self) -> None:
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            if not body.get("stream"):
                return web.json_response(
                    {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                              "total_tokens": 2}}
                )
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(CHUNK)
            await self.gates[request.headers.get("x-gate", "")].wait()
            await resp.write(END)
            return resp

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app

    def open_all(self) -> None:
        for gate in self.gates.values():
            gate.set()


@pytest.fixture
async def gates(start_upstream: StartUpstream) -> AsyncIterator[tuple[Gates, Upstream]]:
    g = Gates()
    up = await start_upstream(g.app())
    yield g, up
    g.open_all()


async def open_stream(http: aiohttp.ClientSession, url: str, gate: str) -> aiohttp.ClientResponse:
    """Start a stream through the gateway at `url` held by `gate`; once admitted, its first
    chunk has arrived (the stream is live)."""
    resp = await http.post(
        f"{url}/v1/chat/completions", json=chat_body(), headers={**AUTH, "x-gate": gate}
    )
    if resp.status == 200:
        assert (await resp.content.readline()).startswith(b"data: ")  # the stream is live
    return resp
