"""The relay handlers: /v1/* to an upstream and back, streams event by event.

A stream is a plain loop of awaits: read what the upstream has, cut it at the last complete
SSE event, pass it through the usage tap (a byte test; JSON only on the usage chunk), write
it. Nothing per chunk but the bytes themselves and one clock read for the heartbeat.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web

from . import validation
from .errors import BadRequest, Forbidden, NotFound, UpstreamError, sse_error_event
from .exchange import Exchange, Outcome
from .metrics import METRICS
from .process.drain import DRAIN, ShuttingDown
from .sse import EventSplitter, SSEError
from .state import CONFIG, EXCHANGE, IDENTITY
from .upstream.pool import UPSTREAMS, forward_headers, read_to_end, relay_headers
from .usage.tap import Usage, UsageTap, ensure_usage_requested
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

    One timer per stream, re-armed lazily: the hot path only stores the clock in `last`;
    the timer, when it fires early, sleeps again until `last + interval`.

    With a `guard`, the same timer is the write deadline (see `gateway.writeguard`): a client
    that has taken no byte for the guard's timeout is dropped, checked once per firing, so
    at no cost per chunk.
    """

    __slots__ = ("_guard", "_handle", "_interval", "_loop", "_out", "_task", "last")

    def __init__(
        self, out: web.StreamResponse, interval: float, *, guard: WriteGuard | None = None
    ) -> None:
        self._out = out
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self._task: asyncio.Task[None] | None = None
        self._guard = guard
        self._handle = self._loop.call_at(self.last + interval, self._fire)

    def _fire(self) -> None:
        now = self._loop.time()
        guard = self._guard
        if guard is not None and guard.stalled(now):
            guard.drop()  # the handler is cancelled: outcome client_disconnected
            return
        due = self.last + self._interval
        if now >= due - 0.001:
            # No ping while bytes still wait to be sent: the line is not silent.
            if (self._task is None or self._task.done()) and not (guard and guard.pending):
                self._task = self._loop.create_task(self._ping())
            self.last = now
            due = now + self._interval
        self._handle = self._loop.call_at(due, self._fire)

    async def _ping(self) -> None:
        try:
            await self._out.write(PING)
        except (ConnectionError, RuntimeError):
            pass  # the stream loop sees the disconnect on its own

    def stop(self) -> None:
        self._handle.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()


async def relay_post(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses."""
    ex = request[EXCHANGE]
    # No frame of a stream keeps the parsed body or its bytes (a chat history can be large,
    # a stream can last minutes): they go straight into `_relay`, which drops them once sent.
    return await _relay(request, ex, "POST", *await _read_post(request, ex))


async def _read_post(request: web.Request, ex: Exchange) -> tuple[str, bytes, bool]:
    """Read and check a POST body: (upstream path, bytes to send, strip usage?)."""
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else ""
    validate, usage_capable = validation.POST_ROUTES[route]
    raw, body = await validation.read_json(request)
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
    data = await read_to_end(resp, MAX_JSON_BYTES)
    if resp.status >= 400 and api_key and api_key.encode() in data:
        # Some upstreams quote the credential they were sent in a 401 message: the
        # upstream's key must not reach our client through an error relayed "as sent".
        data = data.replace(api_key.encode(), b"[REDACTED]")
    if resp.status == 200 and resp.content_type == "application/json":
        # Parsed anyway for usage; an answer that is not JSON at all is garbage: 502.
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamError(
                "upstream answered invalid JSON", code="bad_upstream_response"
            ) from None
        if isinstance(obj, dict):
            ex.usage = Usage.from_obj(obj.get("usage"))
    headers = relay_headers(resp.headers, resp.status)
    return web.Response(
        status=resp.status,
        body=data,
        headers=headers,
        content_type=resp.content_type or "application/json",
    )


async def _relay_stream(
    request: web.Request, ex: Exchange, resp: aiohttp.ClientResponse, strip: bool
) -> web.StreamResponse:
    cfg = request.app[CONFIG]
    out = web.StreamResponse(status=200, headers=SSE_HEADERS)
    # Hold the headers back so they leave with the first event in one write (one syscall
    # less per stream, and the first event sooner); `send_headers()` below when nothing has
    # arrived yet, so a client is never kept waiting for them.
    out._send_headers_immediately = False
    writer = await out.prepare(request)
    held = writer is not None
    ex.status = 200
    splitter = EventSplitter(cfg.sse.max_event_bytes)
    tap = UsageTap(strip)
    heartbeat = Heartbeat(
        out,
        cfg.sse.heartbeat_interval,
        guard=WriteGuard(request, cfg.sse.write_timeout, asyncio.get_running_loop().time()),
    )
    loop = asyncio.get_running_loop()
    read = resp.content.readany
    failure: tuple[Outcome, bytes] | None = None
    events = 0  # `data:` lines relayed: the usage of a stream its client cut short
    active = request.app[METRICS].active_streams
    active.inc()
    try:
        while True:
            try:
                if held:
                    held = False
                    data = resp.content.read_nowait()  # what came with the upstream's headers
                    if not data:
                        assert writer is not None
                        writer.send_headers()
                        continue
                else:
                    data = await read()
                if not data:
                    break
                block = splitter.feed(data)
            except TimeoutError:
                failure = (
                    "timeout",
                    sse_error_event("upstream timed out", "timeout", "upstream_timeout"),
                )
                break
            except ShuttingDown as exc:
                failure = ("timeout", exc.sse_event())
                break
            except SSEError as exc:
                failure = (
                    "upstream_error",
                    sse_error_event(str(exc), "upstream_error", "event_too_large"),
                )
                break
            except aiohttp.ClientError:
                failure = (
                    "upstream_error",
                    sse_error_event(
                        "upstream connection lost", "upstream_error", "upstream_disconnected"
                    ),
                )
                break
            if block:
                block = tap.process(block)
                events += block.count(b"data:")
                heartbeat.last = loop.time()
                await out.write(block)
                if ex.ttfb is None:
                    ex.ttfb = loop.time()
        if failure is None and (rest := splitter.flush()).strip():
            # The upstream's last event lacked its blank line: complete it rather than drop it.
            heartbeat.last = loop.time()
            await out.write(tap.process(rest + b"\n\n"))
        if failure is None and not tap.done and request.path != "/v1/responses":
            # The upstream closed without `data: [DONE]`: the client must not mistake
            # a cut stream for a finished one.
            failure = (
                "upstream_error",
                sse_error_event(
                    "upstream ended the stream early", "upstream_error", "stream_truncated"
                ),
            )
        if failure is not None:
            ex.outcome = failure[0]
            await out.write(failure[1])
        heartbeat.stop()
        await out.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        # The client went away (write failed, or aiohttp cancelled the handler). One that
        # leaves right after `data: [DONE]` (as the openai SDK does) got the whole stream.
        ex.delivered = tap.done
        if not tap.done:
            ex.outcome = "client_disconnected"
        raise
    finally:
        heartbeat.stop()
        active.dec()
        ex.usage = tap.usage
        if ex.usage is None and ex.outcome == "client_disconnected" and events:
            # Cut before the upstream's usage chunk: charge the deltas relayed until then,
            # about one token each (the prompt's size is unknown here).
            ex.usage = Usage(completion_tokens=events, total_tokens=events)
    return out
