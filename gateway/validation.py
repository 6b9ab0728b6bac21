"""Reading and checking request bodies before anything goes upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from .bodies import read_capped
from .errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from .state import CONFIG

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

Body = dict[str, Any]


async def _read_body(request: web.Request, cap: int) -> bytes:
    """Not `request.read()`: aiohttp keeps what that returns on the request for the
    request's life, and a stream's request lives as long as the stream (with its prompt)."""
    return await read_capped(request.content, cap, lambda: _too_large(cap))


def _too_large(cap: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than {cap} bytes")


class ReadBody:
    """A body one handler read and looked at, handed to another that takes it once: after
    `take()` the holder keeps nothing for the rest of a stream."""

    __slots__ = ("_read",)

    def __init__(self, raw: bytes, body: Body) -> None:
        self._read: tuple[bytes, Body] | None = (raw, body)

    def take(self) -> tuple[bytes, Body]:
        read, self._read = self._read, None
        if read is None:
            raise RuntimeError("the body was taken already")
        return read


async def read_json(request: web.Request) -> tuple[bytes, Body]:
    """The raw body and its JSON object; 415 / 413 / 400 when it is not one."""
    ctype = request.headers.get("Content-Type")
    # A missing Content-Type is read as JSON (curl -d without -H sends form type; SDKs send JSON).
    if (
        ctype is not None
        and request.content_type not in ("application/json", "text/json")
        and not (request.content_type.endswith("+json"))
    ):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.content_type!r}"
        )
    server = request.app[CONFIG].server
    if (request.content_length or 0) > server.max_body_bytes:
        # Refused on the declared length, without waiting for bytes that may never come.
        raise _too_large(server.max_body_bytes)
    try:
        if request.content.is_eof():
            # All of it arrived with the headers (the common small body): nothing to wait for.
            raw = await _read_body(request, server.max_body_bytes)
        else:
            # A body that never finishes must not hold the connection (and a handler) forever.
            async with asyncio.timeout(server.body_timeout):
                raw = await _read_body(request, server.max_body_bytes)
    except TimeoutError:
        raise RequestTimeout(
            f"Request body did not arrive within {server.body_timeout:g} seconds"
        ) from None
    if not raw:
        raise BadRequest("Request body is empty: a JSON object is required")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"Request body is not valid JSON: {exc.msg}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object")
    return raw, body


def _model(body: Body) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter", code="missing_model")


def _stream_flag(body: Body) -> None:
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise BadRequest("'stream' must be a boolean", code="invalid_type")


def chat(body: Body) -> None:
    _model(body)
    _stream_flag(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", code="invalid_messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"'messages[{i}]' must be an object", code="invalid_messages")
        if m.get("role") not in ROLES:
            raise BadRequest(
                f"'messages[{i}].role' must be one of " + ", ".join(sorted(ROLES)),
                code="invalid_messages",
            )


def completions(body: Body) -> None:
    _model(body)
    _stream_flag(body)
    if "prompt" not in body:
        raise BadRequest("You must provide a prompt parameter", code="missing_prompt")


def embeddings(body: Body) -> None:
    _model(body)
    if "input" not in body:
        raise BadRequest("You must provide an input parameter", code="missing_input")


def responses(body: Body) -> None:
    _model(body)
    _stream_flag(body)


Validator = Callable[[Body], None]

# The POST routes relayed, each with its check and whether usage may be requested for it.
POST_ROUTES: dict[str, tuple[Validator, bool]] = {
    "/v1/chat/completions": (chat, True),
    "/v1/completions": (completions, True),
    "/v1/embeddings": (embeddings, False),
    "/v1/responses": (responses, False),
}


def dumps(body: Body) -> bytes:
    return orjson.dumps(body)
