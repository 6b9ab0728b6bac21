"""The bundled fake upstream speaks OpenAI's wire format, byte for byte where it matters."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openai import AsyncOpenAI

from gateway.mock_upstream import (
    MOCK_STATE,
    MockSettings,
    MockState,
    build_parser_args,
    create_mock_app,
    reply_pieces,
    run,
)

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hello there"}]}
STREAM = {**CHAT, "stream": True}
WITH_USAGE = {**STREAM, "stream_options": {"include_usage": True}}
ROOT = Path(__file__).resolve().parents[1]
USAGE = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


async def make_client(
    aiohttp_client: ClientFactory, **settings: Any
) -> TestClient[web.Request, web.Application]:
    values: dict[str, Any] = {"chunks": 3, "delay": 0.0, **settings}
    return await aiohttp_client(create_mock_app(MockSettings(**values)))


def state_of(client: TestClient[web.Request, web.Application]) -> MockState:
    return client.app[MOCK_STATE]


def events_of(raw: bytes) -> list[Any]:
    """Every event must be exactly `data: <payload>\\n\\n`."""
    assert raw.endswith(b"\n\n")
    events = []
    for block in raw.decode().split("\n\n")[:-1]:
        assert block.startswith("data: ")
        assert "\n" not in block
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def post_stream(
    client: TestClient[web.Request, web.Application], body: dict[str, Any], **headers: str
) -> list[Any]:
    async with client.post("/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        return events_of(await resp.read())


def test_reply_pieces_echo_the_prompt_then_fill() -> None:
    assert reply_pieces("hello there", 3, 1) == ["You", " said:", " hello"]
    assert reply_pieces("hi", 3, 2) == ["You said:", " hi lorem", " ipsum dolor"]
    assert reply_pieces("anything", 0, 1) == []


async def test_stream_events_follow_openai_order_and_shape(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client)

    events = await post_stream(client, STREAM)

    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) == 5
    assert len({c["id"] for c in chunks}) == 1
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "mock-gpt"
        assert isinstance(chunk["created"], int)
        assert "usage" not in chunk
    choices = [c["choices"] for c in chunks]
    blank = {"index": 0, "logprobs": None, "finish_reason": None}
    assert choices == [
        [{**blank, "delta": {"role": "assistant", "content": ""}}],
        [{**blank, "delta": {"content": "You"}}],
        [{**blank, "delta": {"content": " said:"}}],
        [{**blank, "delta": {"content": " hello"}}],
        [{**blank, "delta": {}, "finish_reason": "stop"}],
    ]
    assert state_of(client).completed_streams == 1
    assert state_of(client).open_streams == 0


async def test_include_usage_openai_style_ends_with_empty_choices_chunk(
    aiohttp_client: ClientFactory,
) -> None:
    client = await make_client(aiohttp_client)

    events = await post_stream(client, WITH_USAGE)

    *chunks, last, done = events
    assert done == "[DONE]"
    assert last["choices"] == []
    assert last["usage"] == USAGE
    assert all(c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("style", "carrier"),
    [("vllm", -2), ("last-chunk", -3)],  # the finish chunk; the last content chunk
)
async def test_usage_styles_place_usage_beside_a_choice(
    aiohttp_client: ClientFactory, style: str, carrier: int
) -> None:
    client = await make_client(aiohttp_client, usage_style=style)

    events = await post_stream(client, WITH_USAGE)

    assert events[-1] == "[DONE]"
    assert len(events) == 6
    assert all(e["choices"] for e in events[:-1])
    with_usage = [i - len(events) for i, e in enumerate(events[:-1]) if "usage" in e]
    assert with_usage == [carrier]
    assert events[carrier]["usage"] == USAGE


async def test_usage_style_without_include_usage_sends_no_usage(
    aiohttp_client: ClientFactory,
) -> None:
    client = await make_client(aiohttp_client, usage_style="vllm")

    events = await post_stream(client, STREAM)

    assert not any("usage" in e for e in events[:-1])


async def test_headers_override_chunks_size_and_usage_style(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client)
    headers = {"x-mock-chunks": "4", "x-mock-chunk-size": "2", "x-mock-usage-style": "vllm"}

    events = await post_stream(client, WITH_USAGE, **headers)

    contents = [e["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert contents == reply_pieces("hello there", 4, 2)
    assert "".join(contents) == "You said: hello there lorem ipsum dolor sit"
    assert events[-2]["usage"] == {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}


async def test_delay_header_spaces_the_events(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client)
    started = time.monotonic()

    await post_stream(client, STREAM, **{"x-mock-delay": "0.05"})

    assert time.monotonic() - started >= 0.05 * 5  # six events, five gaps


@pytest.mark.parametrize(
    "headers",
    [
        {"x-mock-chunks": "many"},
        {"x-mock-chunk-size": "0"},
        {"x-mock-delay": "-1"},
        {"x-mock-usage-style": "azure"},
        {"x-mock-status": "200"},
    ],
)
async def test_bad_mock_headers_are_400(
    aiohttp_client: ClientFactory, headers: dict[str, str]
) -> None:
    client = await make_client(aiohttp_client)

    async with client.post("/v1/chat/completions", json=STREAM, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_non_stream_chat_is_a_chat_completion_with_usage(
    aiohttp_client: ClientFactory,
) -> None:
    client = await make_client(aiohttp_client)

    async with client.post("/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        body = await resp.json()

    assert body["object"] == "chat.completion"
    assert body["model"] == "mock-gpt"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "You said: hello", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == USAGE
    assert state_of(client).last_body == CHAT


async def test_status_fault_answers_openai_error_with_retry_after(
    aiohttp_client: ClientFactory,
) -> None:
    client = await make_client(aiohttp_client)
    headers = {"x-mock-status": "503", "x-mock-retry-after": "1"}

    async with client.post("/v1/chat/completions", json=STREAM, headers=headers) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        error = (await resp.json())["error"]

    assert error["type"] == "server_error"
    assert error["code"] == "mock_fault"
    assert isinstance(error["message"], str)


async def test_status_fault_429_is_a_rate_limit_error(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client)

    async with client.post("/v1/embeddings", headers={"x-mock-status": "429"}) as resp:
        assert resp.status == 429
        assert "Retry-After" not in resp.headers
        assert (await resp.json())["error"]["type"] == "rate_limit_error"


async def test_first_byte_delay_holds_back_the_headers(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client)
    started = time.monotonic()

    async with client.get("/v1/models", headers={"x-mock-first-byte-delay": "0.2"}) as resp:
        assert resp.status == 200
        assert time.monotonic() - started >= 0.2


async def read_lines(resp: aiohttp.ClientResponse, into: list[bytes]) -> None:
    async for line in resp.content:
        into.append(line)


async def test_fail_after_breaks_the_body_after_n_events(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client)
    lines: list[bytes] = []

    async with client.post(
        "/v1/chat/completions", json=STREAM, headers={"x-mock-fail-after": "2"}
    ) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_lines(resp, lines)

    assert lines[1::2] == [b"\n", b"\n"]  # two whole events arrived, then the break
    assert [
        json.loads(line.removeprefix(b"data: "))["choices"][0]["delta"] for line in lines[::2]
    ] == [
        {"role": "assistant", "content": ""},
        {"content": "You"},
    ]
    assert state_of(client).aborted_streams == 1
    assert state_of(client).completed_streams == 0


async def test_client_disconnect_reaches_the_mock(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client, chunks=1000, delay=0.01)
    state = state_of(client)

    resp = await client.post("/v1/chat/completions", json=STREAM)
    await resp.content.readuntil(b"\n\n")
    assert state.open_streams == 1
    resp.close()

    await asyncio.wait_for(state.client_disconnected.wait(), timeout=5)
    assert state.client_disconnects == 1
    assert state.open_streams == 0
    assert state.completed_streams == 0


@pytest.mark.parametrize("authorization", [None, "Bearer sk-wrong", "sk-upstream"])
async def test_wrong_upstream_key_is_401(
    aiohttp_client: ClientFactory, authorization: str | None
) -> None:
    client = await make_client(aiohttp_client, api_key="sk-upstream")
    headers = {} if authorization is None else {"Authorization": authorization}

    async with client.post("/v1/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 401
        error = (await resp.json())["error"]

    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"


async def test_right_upstream_key_is_recorded(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client, api_key="sk-upstream")
    headers = {"Authorization": "Bearer sk-upstream", "X-Request-ID": "r-1"}

    async with client.post("/v1/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 200

    state = state_of(client)
    assert state.last_headers["authorization"] == "Bearer sk-upstream"
    assert state.last_headers["x-request-id"] == "r-1"
    assert state.requests == {"/v1/chat/completions": 1}


@pytest.mark.parametrize(
    ("path", "data"),
    [
        ("/v1/chat/completions", b'{"model": "mock-gpt", "messages": ['),
        ("/v1/chat/completions", b"[]"),
        ("/v1/chat/completions", b'{"model": "mock-gpt", "messages": []}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}'),
        ("/v1/completions", b'{"model": "mock-gpt", "prompt": 3}'),
        ("/v1/embeddings", b'{"model": "m", "input": "x", "dimensions": 1000}'),
    ],
)
async def test_malformed_requests_are_400(
    aiohttp_client: ClientFactory, path: str, data: bytes
) -> None:
    client = await make_client(aiohttp_client)

    async with client.post(path, data=data) as resp:
        assert resp.status == 400
        body = await resp.json()

    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"


async def test_unknown_route_and_method_are_openai_errors(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client)

    async with client.get("/v1/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found_error"
    async with client.get("/v1/chat/completions") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"


async def test_models_lists_mock_models(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client)

    async with client.get("/v1/models") as resp:
        body = await resp.json()

    assert body["object"] == "list"
    assert {"mock-gpt", "gpt-4o-mini"} <= {m["id"] for m in body["data"]}
    assert all(m["object"] == "model" for m in body["data"])


async def test_completions_stream_and_json(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client)
    body = {"model": "mock-gpt", "prompt": "say it", "stream": True}

    async with client.post("/v1/completions", json=body) as resp:
        events = events_of(await resp.read())
    async with client.post("/v1/completions", json={**body, "stream": False}) as resp:
        whole = await resp.json()

    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert texts == ["You", " said:", " say", ""]
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert whole["object"] == "text_completion"
    assert whole["choices"][0]["text"] == "You said: say"
    assert whole["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


async def test_embeddings_are_deterministic(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client)
    body = {"model": "text-embedding-3-small", "input": ["a b", "c"], "dimensions": 4}

    async with client.post("/v1/embeddings", json=body) as resp:
        first = await resp.json()
    async with client.post("/v1/embeddings", json=body) as resp:
        second = await resp.json()

    assert first["data"] == second["data"]
    assert [len(d["embedding"]) for d in first["data"]] == [4, 4]
    assert first["data"][0]["embedding"] != first["data"][1]["embedding"]
    assert first["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


async def test_responses_stream_ends_with_completed_and_usage(
    aiohttp_client: ClientFactory,
) -> None:
    client = await make_client(aiohttp_client)
    body = {"model": "mock-gpt", "input": "hello there", "stream": True}

    async with client.post("/v1/responses", json=body) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        blocks = (await resp.read()).decode().split("\n\n")[:-1]
    async with client.post("/v1/responses", json={**body, "stream": False}) as resp:
        whole = await resp.json()

    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    datas = [json.loads(b.split("\n")[1].removeprefix("data: ")) for b in blocks]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [d["type"] for d in datas] == names
    assert [d["sequence_number"] for d in datas] == list(range(len(names)))
    assert "".join(d["delta"] for d in datas[4:7]) == "You said: hello"
    usage = {"input_tokens": 2, "output_tokens": 3, "total_tokens": 5}
    assert datas[-1]["response"]["usage"] == usage == whole["usage"]
    assert whole["output"][0]["content"][0]["text"] == "You said: hello"


async def test_openai_sdk_streams_the_expected_text(aiohttp_client: ClientFactory) -> None:
    client = await make_client(aiohttp_client, chunks=12, chunk_size=2, api_key="sk-upstream")
    base_url = str(client.make_url("/v1"))

    async with AsyncOpenAI(base_url=base_url, api_key="sk-upstream", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="mock-gpt",
            messages=[{"role": "user", "content": "stream me something"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        models = await sdk.models.list()
        embedding = await sdk.embeddings.create(model="text-embedding-3-small", input="x")

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(reply_pieces("stream me something", 12, 2))
    assert text.startswith("You said: stream me something lorem")
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 24
    assert "mock-gpt" in [m.id for m in models.data]
    assert len(embedding.data[0].embedding) == 8  # the SDK asks for base64 and decodes it


def test_parser_defaults_match_the_brief() -> None:
    parser = argparse.ArgumentParser()
    build_parser_args(parser)

    args = parser.parse_args([])

    assert (args.host, args.port, args.chunks, args.chunk_size) == ("127.0.0.1", 9090, 20, 1)
    assert (args.delay, args.usage_style, args.api_key) == (0.02, "openai", None)


def test_run_refuses_bad_settings_before_binding(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    build_parser_args(parser)

    assert run(parser.parse_args(["--chunk-size", "0", "--port", "1"])) == 2
    assert "chunk_size" in capsys.readouterr().err


async def test_run_serves_until_sigterm_then_exits_0() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "import argparse, sys; from gateway.mock_upstream import build_parser_args, run; "
        "p = argparse.ArgumentParser(); build_parser_args(p); "
        "sys.exit(run(p.parse_args(sys.argv[1:])))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--port",
        str(port),
        "--api-key",
        "sk-up",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        banner = await asyncio.wait_for(proc.stdout.readline(), timeout=10)
        assert banner.decode().strip() == f"mock upstream serving http://127.0.0.1:{port}/v1"
        headers = {"Authorization": "Bearer sk-up"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/v1/models", headers=headers) as resp,
        ):
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
