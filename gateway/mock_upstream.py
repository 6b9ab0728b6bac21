"""A fake OpenAI-compatible upstream: deterministic streams that spend no tokens.

`gateway mock-upstream --port N` serves it for the demo and benchmarks; tests build it with
`create_mock_app(MockSettings(...))` on a loopback port and read `app[MOCK_STATE]`.
A chat reply is "You said: <last user message>" padded with filler words and cut to
`chunks * chunk_size` words; one word is one token, so `usage` is exact and `reply_pieces`
gives tests the very deltas that will be streamed.

Request headers override the settings (`x-mock-chunks`, `x-mock-chunk-size`, `x-mock-delay`,
`x-mock-usage-style`) and inject faults:

    x-mock-status: 503            answer that status (400-599) with an OpenAI error body
    x-mock-retry-after: 1         ... carrying this Retry-After header
    x-mock-first-byte-delay: 2.5  sleep this many seconds before the response headers
    x-mock-fail-after: N          write N SSE events, then abort the connection mid-body
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import hmac
import os
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

import orjson
from aiohttp import web
from multidict import CIMultiDict

Json = dict[str, Any]
UsageStyle = Literal["openai", "vllm", "last-chunk"]
USAGE_STYLES: tuple[str, ...] = get_args(UsageStyle)
MODELS = ("mock-gpt", "gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed")


@dataclass(frozen=True, slots=True)
class MockSettings:
    """How the mock answers; all but `api_key` can be overridden per request by header."""

    chunks: int = 20  # content chunks per stream
    chunk_size: int = 1  # words (= tokens) per content chunk
    delay: float = 0.02  # seconds between two SSE events
    usage_style: UsageStyle = "openai"  # where a stream's usage goes (see `_with_usage`)
    api_key: str | None = None  # when set, `Authorization: Bearer <api_key>` is required

    def __post_init__(self) -> None:
        if self.chunks < 0 or self.chunk_size < 1 or not self.delay >= 0:
            raise ValueError("need chunks >= 0, chunk_size >= 1 and delay >= 0")
        if self.usage_style not in USAGE_STYLES:
            raise ValueError(f"usage_style must be one of {USAGE_STYLES}")


@dataclass(slots=True)
class MockState:
    """What the mock saw, for tests to assert on."""

    requests: Counter[str] = field(default_factory=Counter)  # by path, every request
    last_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    last_body: Json | None = None  # last JSON body that parsed
    open_streams: int = 0
    completed_streams: int = 0
    aborted_streams: int = 0  # ended by x-mock-fail-after
    client_disconnects: int = 0  # streams cut short by the client (or a cancelled handler)
    client_disconnected: asyncio.Event = field(default_factory=asyncio.Event)


MOCK_SETTINGS = web.AppKey("mock_settings", MockSettings)
MOCK_STATE = web.AppKey("mock_state", MockState)


class _MockError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _error(status: int, message: str, code: str | None = None, **headers: str) -> web.Response:
    types = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
    type_ = types.get(status, "rate_limit_error" if status == 429 else "invalid_request_error")
    error = {"message": message, "type": "server_error" if status >= 500 else type_}
    body = orjson.dumps({"error": {**error, "param": None, "code": code}})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def reply_pieces(prompt: str, chunks: int, chunk_size: int) -> list[str]:
    """The content deltas streamed in reply to `prompt`; `"".join()` them for the whole text."""
    total = chunks * chunk_size
    words = f"You said: {prompt}".split()[:total]
    words += [_FILLER[i % len(_FILLER)] for i in range(total - len(words))]
    return [
        (" " if i else "") + " ".join(words[i : i + chunk_size])
        for i in range(0, total, chunk_size)
    ]


def _text(content: object) -> str:
    """A message's text: a string, or the text parts of a content array."""
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return content if isinstance(content, str) else ""


def _usage(
    prompt: str, pieces: list[str], kinds: tuple[str, str] = ("prompt", "completion")
) -> Json:
    p, c = len(prompt.split()), sum(len(piece.split()) for piece in pieces)
    return {f"{kinds[0]}_tokens": p, f"{kinds[1]}_tokens": c, "total_tokens": p + c}


def _number(request: web.Request, name: str, default: float, minimum: float) -> float:
    raw = request.headers.get(name)
    try:
        value = default if raw is None else float(raw)
    except ValueError:
        value = minimum - 1
    if not value >= minimum:  # also refuses NaN
        raise _MockError(400, f"header {name} must be a number >= {minimum}, got {raw!r}")
    return value


def _reply(request: web.Request, prompt: str) -> tuple[MockSettings, list[str]]:
    """The settings with this request's x-mock-* overrides, and the pieces of the reply."""
    base = request.app[MOCK_SETTINGS]
    style = request.headers.get("x-mock-usage-style", base.usage_style)
    if style not in USAGE_STYLES:
        raise _MockError(400, f"header x-mock-usage-style must be one of {USAGE_STYLES}")
    s = dataclasses.replace(
        base,
        chunks=int(_number(request, "x-mock-chunks", base.chunks, 0)),
        chunk_size=int(_number(request, "x-mock-chunk-size", base.chunk_size, 1)),
        delay=_number(request, "x-mock-delay", base.delay, 0),
        usage_style=cast(UsageStyle, style),
    )
    return s, reply_pieces(prompt, s.chunks, s.chunk_size)


async def _body(request: web.Request) -> Json:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise _MockError(400, f"We could not parse the JSON body of your request: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise _MockError(400, "The body must be a JSON object with a string 'model'.")
    request.app[MOCK_STATE].last_body = body
    return body


def _last_user(messages: list[Any]) -> str:
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return _text(users[-1]) if users else ""


def _choice(finish: bool, **fields: Any) -> Json:
    return {"index": 0, **fields, "logprobs": None, "finish_reason": "stop" if finish else None}


def _with_usage(
    base: Json, choices: list[Json], usage: Json | None, style: UsageStyle
) -> Iterator[bytes]:
    """SSE events of one stream, usage placed as `style` servers place it, then [DONE].

    openai: a last chunk with `"choices": []` and `usage`; every other chunk says `"usage": null`.
    vllm: usage beside the final empty-delta choice. last-chunk: on the last content chunk.
    """
    last = len(choices) - 1
    target = {"vllm": last, "last-chunk": max(0, last - 1)}.get(style, -1)
    for i, choice in enumerate(choices):
        chunk = {**base, "choices": [choice]}
        if usage is not None and (i == target or style == "openai"):
            chunk["usage"] = usage if i == target else None
        yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    if usage is not None and style == "openai":
        yield b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def _send_sse(
    request: web.Request, delay: float, events: Iterable[bytes]
) -> web.StreamResponse:
    """Write `events` with `delay` between them; count disconnects, honour x-mock-fail-after."""
    state = request.app[MOCK_STATE]
    fail = request.headers.get("x-mock-fail-after")
    fail_after = None if fail is None else int(_number(request, "x-mock-fail-after", 0, 0))
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    state.open_streams += 1
    try:
        for i, event in enumerate(events):
            if i == fail_after:
                break
            if i and delay:
                await asyncio.sleep(delay)
            await resp.write(event)
        if fail_after is not None:
            # Drop the socket with no chunked terminator: the client sees a truncated body.
            if request.transport is not None:
                request.transport.abort()
            state.aborted_streams += 1
            return resp
        await resp.write_eof()
        state.completed_streams += 1
    except (ConnectionResetError, asyncio.CancelledError) as exc:
        state.client_disconnects += 1
        state.client_disconnected.set()
        if isinstance(exc, asyncio.CancelledError):
            raise
    finally:
        state.open_streams -= 1
    return resp


async def _answer(
    request: web.Request,
    s: MockSettings,
    body: Json,
    base: Json,
    choices: list[Json],
    whole: Json,
    usage: Json,
) -> web.StreamResponse:
    """`whole` as JSON, or `choices` (the last one finishing) as SSE chunks of `base`."""
    if not body.get("stream"):
        return web.json_response({**base, "choices": [whole], "usage": usage})
    options = body.get("stream_options")
    wanted = isinstance(options, dict) and options.get("include_usage") is True
    events = _with_usage(base, choices, usage if wanted else None, s.usage_style)
    return await _send_sse(request, s.delay, events)


def _base(request: web.Request, body: Json, prefix: str, obj: str) -> Json:
    n = request.app[MOCK_STATE].requests.total()
    now = int(time.time())
    return {"id": f"{prefix}-mock{n}", "object": obj, "created": now, "model": body["model"]}


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        raise _MockError(400, "'messages' must be a non-empty array of objects.")
    s, pieces = _reply(request, _last_user(messages))
    usage = _usage(" ".join(_text(m.get("content")) for m in messages), pieces)
    base = _base(request, body, "chatcmpl", "chat.completion.chunk")
    deltas = [{"role": "assistant", "content": ""}, *({"content": p} for p in pieces)]
    choices = [*(_choice(False, delta=d) for d in deltas), _choice(True, delta={})]
    message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
    if not body.get("stream"):
        base["object"] = "chat.completion"
    return await _answer(request, s, body, base, choices, _choice(True, message=message), usage)


async def _completions(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    prompt = body.get("prompt", "")
    prompt = prompt[-1] if isinstance(prompt, list) and prompt else prompt
    if not isinstance(prompt, str):
        raise _MockError(400, "'prompt' must be a string or an array of strings.")
    s, pieces = _reply(request, prompt)
    choices = [*(_choice(False, text=p) for p in pieces), _choice(True, text="")]
    whole = _choice(True, text="".join(pieces))
    base = _base(request, body, "cmpl", "text_completion")
    return await _answer(request, s, body, base, choices, whole, _usage(prompt, pieces))


async def _embeddings(request: web.Request) -> web.Response:
    body = await _body(request)
    inputs = [body.get("input")] if isinstance(body.get("input"), str) else body.get("input")
    dims = body.get("dimensions", 8)
    if not isinstance(inputs, list) or not inputs:
        raise _MockError(400, "'input' must be a string or a non-empty array.")
    if type(dims) is not int or not 0 < dims <= 32:
        raise _MockError(400, "'dimensions' must be an integer from 1 to 32 here.")
    data = []
    for i, item in enumerate(inputs):
        digest = hashlib.sha256(str(item).encode()).digest()
        vector = [round(b / 127.5 - 1, 4) for b in digest[:dims]]
        packed = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        encoded = packed if body.get("encoding_format") == "base64" else vector
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = sum(len(str(item).split()) for item in inputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return web.json_response(
        {"object": "list", "data": data, "model": body["model"], "usage": usage}
    )


async def _responses(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    raw = body.get("input", "")
    prompt = _last_user(raw if isinstance(raw, list) else [{"role": "user", "content": raw}])
    s, pieces = _reply(request, prompt)
    rid, text = f"resp_mock{request.app[MOCK_STATE].requests.total()}", "".join(pieces)
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"type": "message", "id": f"msg_{rid}", "role": "assistant", "content": [part]}
    item["status"] = "completed"
    response = {"id": rid, "object": "response", "created_at": int(time.time())}
    response["model"] = body["model"]
    usage = _usage(prompt, pieces, ("input", "output"))
    done = {**response, "status": "completed", "output": [item], "usage": usage}
    if not body.get("stream"):
        return web.json_response(done)
    delta = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    running = {**response, "status": "in_progress", "output": []}
    empty = {**item, "status": "in_progress", "content": []}
    events: list[tuple[str, Json]] = [
        ("response.created", {"response": running}),
        ("response.in_progress", {"response": running}),
        ("response.output_item.added", {"output_index": 0, "item": empty}),
        ("response.content_part.added", {**delta, "part": {**part, "text": ""}}),
        *(("response.output_text.delta", {**delta, "delta": p}) for p in pieces),
        ("response.output_text.done", {**delta, "text": text}),
        ("response.content_part.done", {**delta, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        ("response.completed", {"response": done}),
    ]
    frames = (
        _named_event(name, {"type": name, "sequence_number": n, **data})
        for n, (name, data) in enumerate(events)
    )
    return await _send_sse(request, s.delay, frames)


def _named_event(name: str, data: Json) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _models(request: web.Request) -> web.Response:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in MODELS]
    return web.json_response({"object": "list", "data": data})


@web.middleware
async def _mock_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Record the request, check the key, inject x-mock-* faults, render errors OpenAI's way."""
    state = request.app[MOCK_STATE]
    state.requests[request.path] += 1
    state.last_headers = CIMultiDict(request.headers)
    key = request.app[MOCK_SETTINGS].api_key
    sent = request.headers.get("Authorization", "").encode(errors="replace")
    if key is not None and not hmac.compare_digest(sent, f"Bearer {key}".encode()):
        return _error(401, "Incorrect API key provided.", "invalid_api_key")
    try:
        await asyncio.sleep(_number(request, "x-mock-first-byte-delay", 0, 0))
        if "x-mock-status" in request.headers:
            status = int(_number(request, "x-mock-status", 500, 400))
            retry = request.headers.get("x-mock-retry-after")
            headers = {} if retry is None else {"Retry-After": retry}
            if status > 599:
                raise _MockError(400, "header x-mock-status must be from 400 to 599")
            return _error(
                status, f"The mock upstream answers {status} as asked.", "mock_fault", **headers
            )
        return await handler(request)
    except _MockError as exc:
        return _error(exc.status, exc.message, exc.code)
    except web.HTTPException as exc:  # the router's 404 and 405
        allow = exc.headers.get("Allow")
        return _error(exc.status, exc.reason, **({} if allow is None else {"Allow": allow}))


def create_mock_app(settings: MockSettings) -> web.Application:
    """The mock upstream's app; its `MockState` is at `app[MOCK_STATE]`."""
    app = web.Application(middlewares=[_mock_middleware])
    app[MOCK_SETTINGS] = settings
    app[MOCK_STATE] = MockState()
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/v1/responses", _responses)
    return app


def build_parser_args(parser: argparse.ArgumentParser) -> None:
    """Add the `gateway mock-upstream` flags to `parser`."""
    d, add = MockSettings(), parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    add("--port", type=int, default=9090, help="port to bind (default %(default)s)")
    add("--chunks", type=int, default=d.chunks, help="chunks a stream (default %(default)s)")
    add("--chunk-size", type=int, default=d.chunk_size, help="words a chunk (default %(default)s)")
    add("--delay", type=float, default=d.delay, help="seconds between (default %(default)s)")
    add("--usage-style", choices=USAGE_STYLES, default=d.usage_style, help="where usage goes")
    add("--api-key", help="bearer key to require (default $MOCK_API_KEY; unset: accept any)")


def run(args: argparse.Namespace) -> int:
    """Serve the mock upstream until SIGINT or SIGTERM; return the exit status."""
    key = args.api_key or os.environ.get("MOCK_API_KEY") or None
    try:
        settings = MockSettings(args.chunks, args.chunk_size, args.delay, args.usage_style, key)
    except ValueError as exc:
        print(f"gateway mock-upstream: {exc}", file=sys.stderr)
        return 2
    banner = f"mock upstream serving http://{args.host}:{args.port}/v1"
    web.run_app(
        create_mock_app(settings),
        host=args.host,
        port=args.port,
        access_log=None,
        shutdown_timeout=1.0,
        print=lambda _: print(banner, flush=True),
    )
    return 0
