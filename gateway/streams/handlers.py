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
import secrets

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .. import validation
from ..errors import BadRequest, Forbidden, NotFound
from ..exchange import Exchange
from ..sse import encode_event
from ..state import CONFIG, EXCHANGE, IDENTITY, SLOT
from ..upstream.pool import UPSTREAMS, forward_headers
from ..usage.tap import ensure_usage_requested
from ..writeguard import WriteDeadline
from . import generation
from .log import EVENT_LOG
from .registry import STREAM_TASKS

# What one read may return; a reader far behind catches up in batches of this size.
_READ_LIMIT = 500


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
    sse_cfg = request.app[CONFIG].sse
    events = request.app[EVENT_LOG]
    stream_id = request.match_info["id"]
    after = _last_event_id(request)
    batch = await events.read(stream_id, after, timeout=0, limit=_READ_LIMIT)
    if batch is None:
        raise _unknown()
    if batch.ended and not batch.events:
        return web.Response(status=204)  # EventSource stops reconnecting on 204
    ex = request[EXCHANGE]
    ex.stream = True
    resp = EventSourceResponse(sep="\n", ping_interval=sse_cfg.heartbeat_interval)
    await resp.prepare(request)
    ex.status = 200
    # A reader that stops reading is dropped after write_timeout (aiohttp waits forever).
    deadline = WriteDeadline(request, sse_cfg.write_timeout, sse_cfg.heartbeat_interval)
    try:
        await resp.write(encode_event(retry=sse_cfg.retry_ms))
        age = sse_cfg.max_connection_age
        try:
            async with asyncio.timeout(age if age > 0 else None):
                while True:
                    if batch.events:
                        await resp.write(
                            b"".join(
                                encode_event(e.data, event=e.kind, id=e.id) for e in batch.events
                            )
                        )
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
    if not await request.app[EVENT_LOG].cancel(request.match_info["id"]):
        raise _unknown()
    return web.Response(status=204)
