"""The relay end to end: client -> gateway -> upstream over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest
import structlog
from aiohttp import web

from .conftest import (
    TEST_KEY,
    UPSTREAM_KEY,
    GatewayFactory,
    HeldStreams,
    StartUpstream,
    chat_body,
)


def sse_data(body: bytes) -> list[str]:
    """The data fields of an SSE body, in order (comments skipped)."""
    return [
        line[len("data: "):]
        for line in body.decode().split("\n")
        if line.startswith("data: ")
    ]


def chunks_of(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(d) for d in sse_data(body) if d != "[DONE]"]


def text_of(body: bytes) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks_of(body)
        if c.get("choices")
    )


async def test_stream_relayed_event_by_event_with_sse_headers(gateway, http) -> None:
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert resp.headers["X-Request-ID"]
        body = await resp.read()
    data = sse_data(body)
    assert data[-1] == "[DONE]"
    first = json.loads(data[0])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert text_of(body)


async def test_non_stream_json_is_relayed_with_status_and_content_type(gateway, http) -> None:
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat_body(stream=False)
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        answer = await resp.json()
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["total_tokens"] > 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "mock-gpt", "prompt": "hi"}),
        ("/v1/embeddings", {"model": "mock-embed", "input": "hi"}),
        ("/v1/responses", {"model": "mock-gpt", "input": "hi"}),
    ],
)
async def test_other_post_routes_are_relayed(gateway, http, upstream, path, body) -> None:
    async with http.post(f"{gateway.url}{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.json()
    assert upstream.state.requests[path] == 1


async def test_models_list_is_relayed(gateway, http) -> None:
    async with http.get(f"{gateway.url}/v1/models") as resp:
        assert resp.status == 200
        models = await resp.json()
    assert models["object"] == "list"
    assert any(m["id"] == "mock-gpt" for m in models["data"])


async def test_upstream_key_replaces_client_credentials_and_hop_headers_stay(
    gateway, http, upstream
) -> None:
    headers = {
        "Authorization": "Bearer gw-client-secret-aaaaaaaaaaaa",
        "x-api-key": "gw-client-secret-bbbbbbbbbbbb",
        "Connection": "keep-alive, x-hop",
        "x-hop": "1",
        "Keep-Alive": "timeout=5",
        "Cookie": "session=abc",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "x-custom-trace": "kept",
    }
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat_body(stream=False), headers=headers
    ) as resp:
        assert resp.status == 200
    seen = upstream.state.last_headers
    assert seen["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    for name in ("x-api-key", "Cookie", "Proxy-Authorization", "Keep-Alive", "x-hop"):
        assert name not in seen
    # Not on the allow-list (gateway.upstream.pool.FORWARDED) nor in pass_headers: held.
    assert "x-custom-trace" not in seen


async def test_events_split_at_every_byte_reach_the_client_whole(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory
) -> None:
    """The upstream writes its events one byte at a time, with CRLF line ends; each event
    the client reads is complete (the gateway cuts only at event boundaries)."""
    events = [
        b'data: {"choices":[{"index":0,"delta":{"content":"a\\nb"}}]}\r\n\r\n',
        b": comment\r\n\r\n",
        b'data: {"choices":[{"index":0,"delta":{"content":"c"}}],\r\ndata: "x":1}\r\n\r\n',
        b"data: [DONE]\r\n\r\n",
    ]

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ev in events:
            for i in range(len(ev)):
                await resp.write(ev[i : i + 1])
                await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url)
    received: list[bytes] = []
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gw.url}/v1/chat/completions", json=chat_body(stream_options={"include_usage": True})
        ) as resp:
            async for chunk in resp.content.iter_any():
                received.append(chunk)
    body = b"".join(received)
    assert body == b"".join(events)
    for chunk in received:  # every write ends on an event boundary (a blank line; a CRLF
        # split between its CR and LF leaves a lone LF, itself a harmless blank line)
        assert chunk == b"\n" or chunk.endswith((b"\r\n\r\n", b"\r\n\r")), chunk


async def test_openai_sdk_streams_through_the_gateway(gateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    parts: list[str] = []
    stream = await client.chat.completions.create(
        model="mock-gpt", messages=[{"role": "user", "content": "hello there"}], stream=True
    )
    async for chunk in stream:
        assert chunk.usage is None  # the usage the gateway asked for was stripped
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    await client.close()
    assert "".join(parts)


@pytest.mark.parametrize("style", ["openai", "vllm", "last-chunk"])
async def test_usage_is_requested_then_stripped_but_accounted(
    gateway, http, upstream, style
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with http.post(
            f"{gateway.url}/v1/chat/completions",
            json=chat_body(),
            headers={"x-mock-usage-style": style},
        ) as resp:
            body = await resp.read()
    assert upstream.state.last_body["stream_options"]["include_usage"] is True
    chunks = chunks_of(body)
    assert all("usage" not in c or c["usage"] is None for c in chunks), body
    assert text_of(body)  # the content (also on a last-chunk usage style) is kept
    if style == "last-chunk":
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    access = [e for e in logs if e["event"] == "access"]
    assert access[-1]["completion_tokens"] > 0
    assert access[-1]["prompt_tokens"] > 0


async def test_usage_asked_by_the_client_is_kept(gateway, http) -> None:
    async with http.post(
        f"{gateway.url}/v1/chat/completions",
        json=chat_body(stream_options={"include_usage": True}),
    ) as resp:
        body = await resp.read()
    last = chunks_of(body)[-1]
    assert last["choices"] == []
    assert last["usage"]["total_tokens"] > 0


async def test_stream_headers_reach_the_client_before_a_first_event_that_comes_in_halves(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http
) -> None:
    """The upstream sends its headers and half an event, then pauses 2 s: the client has
    the status and headers at once, not when the event is whole."""
    first = b'data: {"choices":[{"index":0,"delta":{"content":"hello"}}]}\n\n'
    resume = asyncio.Event()

    async def halves(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(first[:20])
        try:
            await asyncio.wait_for(resume.wait(), 2.0)
        except TimeoutError:
            pass
        await resp.write(first[20:] + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", halves)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url)
    loop = asyncio.get_running_loop()
    sent = loop.time()
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        waited = loop.time() - sent
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        resume.set()
        assert await resp.read() == first + b"data: [DONE]\n\n"
    print(f"stream headers after {waited * 1000:.1f} ms")
    assert waited < 1.0, waited  # well under the upstream's 2 s pause (about 5 ms unloaded)


def html_upstream(content_type: str) -> web.Application:
    """Answers every route 200 with an HTML error page, labelled `content_type`."""
    page = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=page, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@pytest.mark.parametrize("content_type", ["text/html", "application/json", "text/plain"])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/chat/completions", chat_body(stream=False)),
        ("POST", "/v1/embeddings", {"model": "mock-embed", "input": "hi"}),
        ("GET", "/v1/models", None),
    ],
)
async def test_a_200_json_route_answered_with_an_html_page_is_502(
    start_upstream: StartUpstream,
    gateway_factory: GatewayFactory,
    http,
    content_type: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    up = await start_upstream(html_upstream(content_type))
    gw = await gateway_factory(up.url, retry={"attempts": 1})
    with structlog.testing.capture_logs() as logs:
        async with http.request(method, f"{gw.url}{path}", json=body) as resp:
            assert resp.status == 502
            assert resp.content_type == "application/json"
            answer = await resp.json()
    assert answer == {
        "error": {
            "message": answer["error"]["message"],
            "type": "upstream_error",
            "code": "bad_upstream_response",
        }
    }
    assert "<html" not in answer["error"]["message"].lower()
    access = [e for e in logs if e["event"] == "access"][-1]
    assert (access["status"], access["outcome"]) == (502, "upstream_error")


async def test_an_open_stream_does_not_keep_its_request_body(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream
) -> None:
    """A stream's request lives as long as the stream: its prompt must not live with it
    (aiohttp's `request.read()` keeps what it returns on the request)."""
    import tracemalloc

    held = HeldStreams()  # which keeps nothing of the prompt itself
    up = await start_upstream(held.app)
    gw = await gateway_factory(up.url)
    size = 1_000_000  # under aiohttp's 1 MiB, past which it warns of a large bytes body
    prompt = [{"role": "user", "content": "x" * size}]
    body = json.dumps(chat_body(stream=True, messages=prompt)).encode()
    del prompt
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n"
        f"Authorization: Bearer {TEST_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    tracemalloc.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(head + body)
        del body
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 30)
        assert b" 200 " in status, status + await reader.read(2000)
        await asyncio.wait_for(held.started.wait(), 30)
        kept, _ = tracemalloc.get_traced_memory()
        held.release.set()
        rest = await asyncio.wait_for(reader.readuntil(b"data: [DONE]"), 10)
        assert rest
        writer.close()
    finally:
        tracemalloc.stop()
    assert kept < size // 2, f"{kept >> 20} MiB held while the stream is open"


async def test_middlewares_that_only_look_hold_no_frame_while_a_stream_runs(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    """Auth and CORS decide before the handler runs and touch nothing after it: an open
    stream (thousands of them, in a reconnect storm) keeps no coroutine frame of theirs."""
    import gc
    import inspect

    held = HeldStreams()
    up = await start_upstream(held.app)
    gw = await gateway_factory(up.url, cors={"allow_origins": ["http://app.example"]})
    headers = {"Authorization": f"Bearer {TEST_KEY}", "Origin": "http://app.example"}
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(stream=True), headers=headers
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "http://app.example"
        await asyncio.wait_for(held.started.wait(), 30)
        live = {o.cr_code.co_name for o in gc.get_objects() if inspect.iscoroutine(o)}
        held.release.set()
        assert b"[DONE]" in await resp.read()
    assert "relay_post" in live  # the stream's own frames are there to be found
    assert not live & {"auth", "cors"}, live


async def test_an_error_raised_through_the_pool_leaves_no_cycle_of_the_pools_own(
    gateway_factory: GatewayFactory,
) -> None:
    """The gateway collects cycles rarely (process.server.GC_THRESHOLD), and a frame in a
    cycle keeps its locals, the request's body among them, until then. aiohttp's own
    connection errors make such cycles (below the pool, bounded by the breaker); the pool's
    retry loop must not add one around every request it gives up on."""
    import gc
    import types

    from .conftest import TEST_KEY

    with socket_bound() as port:  # bound, never listening: connection refused
        gw = await gateway_factory(f"http://127.0.0.1:{port}/v1", retry={"attempts": 2})
        gc.collect()
        gc.disable()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{gw.url}/v1/chat/completions",
                    json=chat_body(stream=False),
                    headers={"Authorization": f"Bearer {TEST_KEY}"},
                ) as r:
                    assert r.status == 502, await r.text()
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            in_cycles = {
                o.f_code.co_qualname
                for o in gc.garbage
                if isinstance(o, types.FrameType) and "gateway" in o.f_code.co_filename
            }
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert "UpstreamPool.open" not in in_cycles
    assert not in_cycles & {"_relay", "relay_post", "UpstreamPool._attempt"}


def socket_bound() -> Any:
    import contextlib
    import socket

    @contextlib.contextmanager
    def bound() -> Any:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            yield s.getsockname()[1]

    return bound()
