"""The relay handlers: /v1/* to an upstream and back, streams event by event.

A stream is `streaming.Pump` with the client's response as its sink: read what the upstream
has, cut it at the last complete SSE event, pass it through the usage tap (a byte test; JSON
only on the usage chunk), write it. Nothing per chunk but the bytes themselves and one clock
read for the heartbeat.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web

from . import validation
from .errors import BadRequest, Forbidden, NotFound, UpstreamError, UpstreamTimeout
from .exchange import Exchange
from .metrics import METRICS
from .process.drain import DRAIN, ShuttingDown
from .state import CONFIG, EXCHANGE, IDENTITY
from .streaming import Failure, Pump
from .ticker import EARLY, TICKER, Ticker
from .upstream.pool import UPSTREAMS, forward_headers, read_to_end, relay_headers, scrub_key
from .usage.tap import Usage, ensure_usage_requested
from .writeguard import WriteGuard

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
PING = b": ping\n\n"

# The longest model id passed upstream in a path.
MAX_SEGMENT_CHARS = 512

# The largest non-stream answer read into memory (embeddings of a large batch fit).
MAX_JSON_BYTES = 64 << 20


class Heartbeat:
    """Writes `: ping` after `interval` seconds with nothing written, never while data flows.

    Checked on the app's `Ticker`, never per chunk: the hot path only stores the clock in
    `last`; a tick that finds `interval` passed since then pings (so a ping comes within
    `interval` plus one tick period of the last write).

    With a `guard`, the same tick checks the write deadline (see `gateway.writeguard`): a
    client that has taken no byte for the guard's timeout is dropped.
    """

    __slots__ = ("_guard", "_interval", "_loop", "_on_ping", "_out", "_task", "_ticker", "last")

    def __init__(
        self,
        out: web.StreamResponse,
        interval: float,
        ticker: Ticker,
        *,
        guard: WriteGuard | None = None,
        on_ping: Callable[[float], None] | None = None,  # gets the seconds of silence
    ) -> None:
        self._out = out
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self._task: asyncio.Task[None] | None = None
        self._guard = guard
        self._on_ping = on_ping
        self._ticker = ticker
        ticker.add(self)

    def tick(self, now: float) -> None:
        guard = self._guard
        if guard is not None and guard.stalled(now):
            self._ticker.discard(self)
            guard.drop()  # the handler is cancelled: outcome client_disconnected
            return
        if now - self.last >= self._interval - EARLY:
            # No ping while bytes still wait to be sent: the line is not silent.
            if (self._task is None or self._task.done()) and not (guard and guard.pending):
                self._task = self._loop.create_task(self._ping())
                if self._on_ping is not None:
                    self._on_ping(now - self.last)
            self.last = now

    async def _ping(self) -> None:
        try:
            await self._out.write(PING)
        except (ConnectionError, RuntimeError):
            pass  # the stream loop sees the disconnect on its own

    def stop(self) -> None:
        self._ticker.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()


async def relay_post(
    request: web.Request, *, read: validation.ReadBody | None = None
) -> web.StreamResponse:
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses (`read`:
    the body, when the route's own handler read it first)."""
    ex = request[EXCHANGE]
    # No frame of a stream keeps the parsed body or its bytes (a chat history can be large,
    # a stream can last minutes): they go straight into `_relay`, which drops them once sent.
    return await _relay(request, ex, "POST", *await _read_post(request, ex, read))


async def _read_post(
    request: web.Request, ex: Exchange, read: validation.ReadBody | None
) -> tuple[str, bytes, bool]:
    """Read and check a POST body: (upstream path, bytes to send, strip usage?)."""
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else ""
    validate, usage_capable = validation.POST_ROUTES[route]
    raw, body = read.take() if read is not None else await validation.read_json(request)
    validate(body)
    ex.model = body["model"]
    ex.stream = body.get("stream") is True
    identity = request.get(IDENTITY)
    if identity is not None and not identity.allows(ex.model):
        raise Forbidden(
            f"Client {identity.client!r} may not use model {ex.model!r}", code="model_not_allowed"
        )
    strip = usage_capable and ex.stream and ensure_usage_requested(body)
    if strip:
        raw = validation.dumps(body)
    return route.removeprefix("/v1"), raw, strip


async def relay_get(request: web.Request) -> web.StreamResponse:
    """GET /v1/models (and /v1/models/{id})."""
    ex = request[EXCHANGE]
    model = request.match_info.get("model")
    path = "/models" if model is None else "/models/" + upstream_segment(model)
    return await _relay(request, ex, "GET", path, None, False)


def upstream_segment(value: str) -> str:
    """`value` (decoded from the request path) as exactly one percent-encoded path segment.

    The upstream URL is built from quoted parts, never from the request's path: `%2F..%2F`
    decoded and passed on would walk the upstream's routes with the gateway's key. A dot
    segment or a control character is no model id: refused before anything is sent.
    """
    if value in (".", "..") or len(value) > MAX_SEGMENT_CHARS:
        raise NotFound(f"The model `{value[:64]}` does not exist", code="model_not_found")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise BadRequest("The model id holds a control character", code="invalid_model")
    return quote(value, safe="")


async def _relay(
    request: web.Request,
    ex: Exchange,
    method: str,
    path: str,
    body: bytes | None,
    strip: bool,
) -> web.StreamResponse:
    pool = request.app[UPSTREAMS]
    up, resp = await pool.open(
        method, path, ex=ex, body=body, headers=forward_headers(request.headers)
    )
    body = None  # sent: not held for the life of a stream
    # Registered while relayed, so a shutdown whose grace ran out can end it cleanly.
    inflight = request.app[DRAIN].responses
    inflight.add(resp)
    try:
        if resp.content_type == "text/event-stream" and resp.status == 200:
            return await _relay_stream(request, ex, resp, strip)
        if ex.stream and resp.status == 200:
            # An SDK waiting for events would choke on whatever this is: garbage, 502.
            raise UpstreamError(
                f"upstream answered a stream request with {resp.content_type!r}, not events",
                code="bad_upstream_response",
            )
        return await _relay_json(ex, resp, up.cfg.api_key)
    finally:
        # Whatever happened (done, client gone, cancelled), the upstream connection is
        # released now; close() drops it when the body was not read to its end.
        inflight.discard(resp)
        if not resp.content.at_eof():
            resp.close()
        resp.release()


async def _relay_json(ex: Exchange, resp: aiohttp.ClientResponse, api_key: str) -> web.Response:
    try:
        data = await read_to_end(resp, MAX_JSON_BYTES)
    except ShuttingDown as exc:
        # The grace ran out while the answer was arriving: its work was done upstream, so
        # no 503 (a proxy passes a 503 on to the next instance, POST included, and the
        # generation would run again there): 504, for the client to decide.
        raise UpstreamTimeout(exc.message, code=exc.code) from None
    # Relayed "as sent", but never with the upstream's key in it: whatever the status (an
    # echoing upstream's 200, a redirect relayed and not followed, an error quoting it).
    data = scrub_key(data, api_key)
    content_type = resp.content_type or "application/json"
    if resp.status == 200:
        # Every /v1 route answers a JSON object on success: parsed anyway for usage, and
        # whatever else it is (an HTML error page from a proxy in front of the upstream,
        # whatever its Content-Type says) is garbage to an SDK: 502.
        obj = _json_answer(data)
        ex.usage = Usage.from_obj(obj.get("usage"))
        if ex.otel is not None:
            ex.otel.response(obj)
        content_type = "application/json"
    headers = relay_headers(resp.headers, resp.status)
    return web.Response(status=resp.status, body=data, headers=headers, content_type=content_type)


def _json_answer(data: bytes) -> dict[str, Any]:
    """A 200 answer to a JSON route, parsed; UpstreamError when it is not a JSON object."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise UpstreamError(
            "upstream answered 200 with a body that is not a JSON object",
            code="bad_upstream_response",
        )
    return obj


class _ClientSink:
    """The relay's `streaming.Sink`: the client's response, one write per block."""

    __slots__ = ("_ex", "_heartbeat", "_out", "_time")

    def __init__(self, out: web.StreamResponse, heartbeat: Heartbeat, ex: Exchange) -> None:
        self._out = out
        self._heartbeat = heartbeat
        self._ex = ex
        self._time = asyncio.get_running_loop().time

    async def send(self, block: bytes) -> None:
        self._heartbeat.last = self._time()
        await self._out.write(block)
        if self._ex.ttfb is None:
            self._ex.ttfb = self._time()

    async def fail(self, failure: Failure) -> None:
        await self._out.write(failure.sse_event())


async def _relay_stream(
    request: web.Request, ex: Exchange, resp: aiohttp.ClientResponse, strip: bool
) -> web.StreamResponse:
    cfg = request.app[CONFIG]
    out = web.StreamResponse(status=200, headers=SSE_HEADERS)
    # The headers leave now, before the first upstream read: a client learns at once that
    # its stream started, even when the upstream's first event arrives in pieces.
    await out.prepare(request)
    ex.status = 200
    pump = Pump(
        cfg.sse.max_event_bytes, strip=strip, require_done=request.path != "/v1/responses"
    )
    heartbeat = Heartbeat(
        out,
        cfg.sse.heartbeat_interval,
        request.app[TICKER],
        guard=WriteGuard(request, cfg.sse.write_timeout, asyncio.get_running_loop().time()),
        on_ping=ex.otel.stalled if ex.otel is not None else None,
    )
    active = request.app[METRICS].active_streams
    active.inc()
    try:
        ex.outcome = await pump.run(resp, _ClientSink(out, heartbeat, ex))
        heartbeat.stop()
        await out.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        # The client went away (write failed, or aiohttp cancelled the handler). One that
        # leaves right after `data: [DONE]` (as the openai SDK does) got the whole stream.
        ex.delivered = pump.done
        if not pump.done:
            ex.outcome = "client_disconnected"
        raise
    finally:
        heartbeat.stop()
        active.dec()
        ex.usage = pump.usage  # the upstream's, else what was relayed (see `Pump.usage`)
        if ex.otel is not None:
            ex.otel.streamed(pump.tap)
    return out
