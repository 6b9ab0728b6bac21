"""Non-stream upstream bodies are read to their end, under a cap (upstream.pool.read_to_end).

The upstreams here send their bodies in pieces with pauses between them, so the gateway's
first read holds only the first piece: a reader that takes what is buffered cuts the body.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway import relay

from .conftest import GatewayFactory, StartUpstream, chat_body
from .test_streams import read_stream, start_stream

PIECES = 20
PAUSE = 0.02  # pacing only (forces many TCP reads); nothing waits on it


def big_answer(size: int) -> bytes:
    """An embeddings-like JSON answer of about `size` bytes, with usage."""
    vector = ",".join("0.123456789" for _ in range(size // 12))
    return (
        b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":['
        + vector.encode()
        + b']}],"model":"m","usage":{"prompt_tokens":3,"total_tokens":3}}'
    )


def paced_app(body: bytes, *, status: int = 200, length: bool) -> web.Application:
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        out = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        if length:
            out.content_length = len(body)
        await out.prepare(request)
        step = -(-len(body) // PIECES)
        for i in range(0, len(body), step):
            await out.write(body[i : i + step])
            await asyncio.sleep(PAUSE)
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_post("/v1/embeddings", answer)
    app.router.add_post("/v1/chat/completions", answer)
    return app


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
async def test_a_5mb_json_answer_in_pieces_reaches_the_client_byte_for_byte(
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    http: aiohttp.ClientSession,
    length: bool,
) -> None:
    body = big_answer(5 << 20)
    up = await start_upstream(paced_app(body, length=length))
    gw = await gateway_factory(up.url)
    async with http.post(
        f"{gw.url}/v1/embeddings", json={"model": "m", "input": ["a"] * 3}
    ) as r:
        got = await r.read()
        assert r.status == 200, got[:300]
    assert len(got) == len(body)
    assert got == body


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
async def test_an_answer_over_the_cap_is_502(
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    length: bool,
) -> None:
    monkeypatch.setattr(relay, "MAX_JSON_BYTES", 1 << 20)
    up = await start_upstream(paced_app(big_answer(2 << 20), length=length))
    gw = await gateway_factory(up.url)
    async with http.post(f"{gw.url}/v1/embeddings", json={"model": "m", "input": "a"}) as r:
        assert r.status == 502
        err = (await r.json())["error"]
    assert err["type"] == "upstream_error" and "too large" in err["message"]


async def test_an_upstream_error_in_pieces_is_the_detached_streams_fail_event_whole(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    message = "quota exceeded: " + "x" * 30000 + " (end of message)"
    error = {"error": {"message": message, "type": "insufficient_quota", "code": "quota"}}
    up = await start_upstream(paced_app(orjson.dumps(error), status=429, length=False))
    gw = await gateway_factory(up.url, retry={"attempts": 1})
    url = await start_stream(http, gw)
    got = await read_stream(http, gw, url)
    assert got.events[-1].kind == "fail"
    assert got.events[-1].data == error


async def test_a_chat_answer_in_pieces_is_relayed_whole(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    answer = {
        "id": "c1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "y" * 300000}}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7},
    }
    body = orjson.dumps(answer)
    up = await start_upstream(paced_app(body, length=False))
    gw = await gateway_factory(up.url)
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(stream=False)) as r:
        assert r.status == 200
        assert await r.read() == body
