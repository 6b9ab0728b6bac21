"""/v1/streams: start a detached generation, follow it with EventSource, stop it.

POST is authenticated like the other /v1 routes; GET and DELETE are public routes: the
unguessable id (192 random bits) is their authorization.

GET uses aiohttp-sse's `EventSourceResponse` for the headers, the `: ping` heartbeat and its
stalled-peer guard (TCP_USER_TIMEOUT). Events are encoded with `gateway.sse.encode_event` and
written a batch at a time (one write for all the events a read returned), rather than one
`send()` each.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import Callable, Iterator, Sequence

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .. import validation
from ..errors import BadRequest, Forbidden, NotFound, Unavailable
from ..exchange import Exchange
from ..sse import encode_event
from ..state import CONFIG, EXCHANGE, IDENTITY, SLOT
from ..ticker import TICKER
from ..upstream.pool import UPSTREAMS, forward_headers
from ..usage.tap import ensure_usage_requested
from ..writeguard import WriteDeadline
from . import generation
from .log import EVENT_LOG, Batch, Event
from .registry import STREAM_TASKS

# What one read may return; a reader far behind catches up in batches of this size.
_READ_LIMIT = 500
# What `start_stream` makes (secrets.token_urlsafe(24)); other logs share the EventLog.
_STREAM_ID = re.compile(r"[A-Za-z0-9_-]{32}")


class Followers:
    """The GET /v1/streams/{id} readers open on this instance, at most `limit` at once.

    The id is the only credential, so one id could open readers without end: each holds a
    socket and, with Redis, a blocking Redis connection. Past the cap: 503.
    """

    __slots__ = ("count", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.count >= self.limit:
            raise Unavailable(
                "Too many readers of detached streams on this instance; retry shortly",
                code="too_many_followers",
                headers={"Retry-After": "1"},
            )
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


FOLLOWERS: web.AppKey[Followers] = web.AppKey("followers")


def _unknown() -> NotFound:
    return NotFound("No such stream (unknown, or expired)", code="stream_not_found")


async def start_stream(request: web.Request) -> web.Response:
    """POST /v1/streams: validate like a chat completion, start it detached, answer 201."""
    ex = request[EXCHANGE]
    _, body = await validation.read_json(request)
    validation.chat(body)
    model: str = body["model"]
    ex.model, ex.stream = model, True
    identity = request.get(IDENTITY)
    if identity is not None and not identity.allows(model):
        raise Forbidden(
            f"Client {identity.client!r} may not use model {model!r}", code="model_not_allowed"
        )
    if not request.app[UPSTREAMS].candidates(model):
        raise NotFound(f"The model `{model}` does not exist", code="model_not_found")
    body["stream"] = True
    ensure_usage_requested(body)
    client = identity.client if identity is not None else "anonymous"
    stream_id = secrets.token_urlsafe(24)
    await request.app[EVENT_LOG].create(stream_id)
    slot = request.get(SLOT)
    if slot is not None:
        slot.detach()  # the generation holds the concurrency slot until it ends
    loop = asyncio.get_running_loop()
    job = generation.Job(
        stream_id=stream_id,
        client=client,
        identity=identity,
        body=validation.dumps(body),
        ex=Exchange(
            request_id=ex.request_id,
            trace_id=ex.trace_id,
            span_id=secrets.token_hex(8),
            trace_flags=ex.trace_flags,
            started=loop.time(),
            client=client,
            model=model,
            stream=True,
        ),
        headers=forward_headers(request.headers),
        slot=slot,
    )
    if ex.otel is not None:  # the generation's own span, linked to this request's
        ex.otel.detached(job.ex)
    request.app[STREAM_TASKS].start(
        generation.run(request.app, job), name=f"stream:{stream_id[:8]}"
    )
    url = f"/v1/streams/{stream_id}"
    return web.Response(
        status=201,
        body=orjson.dumps({"id": stream_id, "url": url}),
        content_type="application/json",
        headers={"Location": url},
    )


def _last_event_id(request: web.Request) -> int:
    """Where to resume: `Last-Event-ID` header, else `?last_event_id=`, else 0 (from the start)."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.query.get("last_event_id")
    if raw is None or raw == "":
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise BadRequest("Last-Event-ID must be an event id (a non-negative integer)")
    return int(raw)


async def follow_stream(request: web.Request) -> web.StreamResponse:
    """GET /v1/streams/{id}: replay after Last-Event-ID, then follow live."""
    with request.app[FOLLOWERS].hold():
        return await _follow(request)


async def _follow(request: web.Request) -> web.StreamResponse:
    events = request.app[EVENT_LOG]
    stream_id = request.match_info["id"]
    if not _STREAM_ID.fullmatch(stream_id):
        raise _unknown()  # not one of ours (a background response's log, say): never served
    after = _last_event_id(request)
    batch = await events.read(stream_id, after, timeout=0, limit=_READ_LIMIT)
    if batch is None:
        raise _unknown()
    if batch.ended and not batch.events:
        return web.Response(status=204)  # EventSource stops reconnecting on 204
    retry = encode_event(retry=request.app[CONFIG].sse.retry_ms)
    return await serve_log(request, stream_id, after, batch, _encode, first=retry)


def _encode(events: Sequence[Event]) -> bytes:
    return b"".join(encode_event(e.data, event=e.kind, id=e.id) for e in events)


async def serve_log(
    request: web.Request,
    stream_id: str,
    after: int,
    batch: Batch,
    encode: Callable[[Sequence[Event]], bytes],
    *,
    first: bytes = b"",
) -> web.StreamResponse:
    """Answer with an event stream: `first`, then `batch` (the log read after `after`), then
    every later event live, each batch written as `encode` makes it, until the log ends."""
    sse_cfg = request.app[CONFIG].sse
    events = request.app[EVENT_LOG]
    ex = request[EXCHANGE]
    ex.stream = True
    resp = EventSourceResponse(
        sep="\n", ping_interval=sse_cfg.heartbeat_interval, allow_all_methods=True
    )
    await resp.prepare(request)
    ex.status = 200
    # A reader that stops reading is dropped after write_timeout (aiohttp waits forever).
    deadline = WriteDeadline(request, sse_cfg.write_timeout, request.app[TICKER])
    try:
        if first:
            await resp.write(first)
        age = sse_cfg.max_connection_age
        try:
            async with asyncio.timeout(age if age > 0 else None):
                while True:
                    if batch.events:
                        if data := encode(batch.events):
                            await resp.write(data)
                            if ex.ttfb is None:
                                ex.ttfb = asyncio.get_running_loop().time()
                        after = batch.events[-1].id
                    if batch.ended:
                        break
                    # Wait for more: the heartbeat (aiohttp-sse's ping task) runs meanwhile.
                    nxt = await events.read(
                        stream_id, after, timeout=sse_cfg.heartbeat_interval, limit=_READ_LIMIT
                    )
                    if nxt is None:
                        break  # freed meanwhile: the reconnect will get 404
                    batch = nxt
        except TimeoutError:
            pass  # max_connection_age: close; EventSource resumes after its last id
        await resp.write_eof()
    finally:
        deadline.stop()
        resp.stop_streaming()
    return resp


async def stop_stream(request: web.Request) -> web.Response:
    """DELETE /v1/streams/{id}: end the log with done(cancelled); the owner then stops."""
    stream_id = request.match_info["id"]
    if not _STREAM_ID.fullmatch(stream_id) or not await request.app[EVENT_LOG].cancel(stream_id):
        raise _unknown()
    return web.Response(status=204)
