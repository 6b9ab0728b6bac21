"""OpenAI's background mode on /v1/responses, for any upstream that speaks /v1/responses.

    POST   /v1/responses {"background": true}   start; the Response (or, with "stream": true,
                                                the event stream itself)
    GET    /v1/responses/{id}                   the Response as it stands
    GET    /v1/responses/{id}?stream=true&starting_after=N
                                                events after sequence number N, then live
    POST   /v1/responses/{id}/cancel            stop it; the Response (idempotent)
    DELETE /v1/responses/{id}                   forget it

The create call waits for the upstream's answer headers, so an upstream that cannot do
/v1/responses is a clear error there, not a response that never moves. From then on the
generation is the app's (`pump.run`), holding the request's concurrency slot, and its log
(`objects`) is the response's whole state: any instance sharing the log's backend serves it.
Every route is authenticated; a response is its creator's alone: to anyone else (or once
`resume_ttl` has passed since it ended) its id is unknown, 404. A POST without
"background": true is relayed as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time

import aiohttp
import orjson
from aiohttp import web

from .. import relay, validation
from ..errors import BadRequest, Forbidden, NotFound, Unavailable, UpstreamError, error_body
from ..exchange import Exchange
from ..state import EXCHANGE, IDENTITY, SLOT
from ..streams.handlers import FOLLOWERS, serve_log
from ..streams.log import EVENT_LOG, Batch
from ..streams.registry import STREAM_TASKS
from ..upstream.pool import UPSTREAMS, error_object, forward_headers, relay_headers
from . import objects, pump

# What a read of the log may return at once (a reader far behind catches up in batches).
_READ_LIMIT = 500
# 192 random bits: unguessable, though ownership, not the id, is what guards a response.
_ID = re.compile(r"resp_[0-9a-f]{48}")
# Past any event id: a read after it only says whether the log has ended.
_END_PROBE = 1 << 53


def _unknown() -> NotFound:
    return NotFound("No such response (unknown, or expired)", code="response_not_found")


def _json(obj: objects.Json, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


async def create(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses: background ones start here; the rest are relayed."""
    raw, body = await validation.read_json(request)
    if body.get("background") is not True:
        read = validation.ReadBody(raw, body)
        del raw, body  # the relay takes them and lets them go once sent
        return await relay.relay_post(request, read=read)
    del raw  # a background response's upstream body is made anew below
    validation.responses(body)
    ex = request[EXCHANGE]
    model: str = body["model"]
    ex.model, ex.stream = model, body.get("stream") is True
    identity = request.get(IDENTITY)
    if identity is not None and not identity.allows(model):
        raise Forbidden(
            f"Client {identity.client!r} may not use model {model!r}", code="model_not_allowed"
        )
    pool = request.app[UPSTREAMS]
    if not pool.candidates(model):
        raise NotFound(f"The model `{model}` does not exist", code="model_not_found")
    client = identity.client if identity is not None else "anonymous"
    response_id = "resp_" + secrets.token_hex(24)
    base = objects.created(response_id, body, int(time.time()))
    upstream_body = {k: v for k, v in body.items() if k != "background"}
    upstream_body["stream"] = True
    gen = Exchange(
        request_id=ex.request_id,
        trace_id=ex.trace_id,
        span_id=secrets.token_hex(8),
        trace_flags=ex.trace_flags,
        started=asyncio.get_running_loop().time(),
        client=client,
        model=model,
        stream=True,
    )
    # A streamed create takes its reader's place first: refused after the start (readers at
    # their cap), the generation would run, and be charged, for a client without its id.
    reader = request.app[FOLLOWERS].hold() if ex.stream else contextlib.nullcontext()
    with reader:
        # The log first (as for detached streams): with its store unreachable the create is
        # refused before anything goes upstream (a 503 after the upstream started would be
        # passed to another instance by a proxy, and started there again).
        events = request.app[EVENT_LOG]
        await events.create(response_id)
        handed = False
        try:
            if await events.append(response_id, objects.META, objects.meta(client, base)) is None:
                raise Unavailable("Background responses are unavailable now")
            up, resp = await pool.open(
                "POST",
                "/responses",
                ex=gen,
                body=validation.dumps(upstream_body),
                headers=forward_headers(request.headers),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await events.delete(response_id)
            raise
        del body, upstream_body  # sent: not held for the life of the generation
        try:
            if resp.status != 200 or resp.content_type != "text/event-stream":
                return await _refused(resp, up.name, up.cfg.api_key)
            slot = request.get(SLOT)
            if slot is not None:
                slot.detach()  # the generation holds the concurrency slot until it ends
            job = pump.Job(response_id, client, identity, base, gen, resp, slot)
            request.app[STREAM_TASKS].start(
                pump.run(request.app, job), name=f"response:{response_id[5:13]}"
            )
            handed = True
        finally:
            if not handed:
                resp.close()
                with contextlib.suppress(Exception):
                    await events.delete(response_id)
        if ex.stream:
            return await _serve(request, response_id, base, 1)
    return _json(base)


async def _refused(resp: aiohttp.ClientResponse, name: str, api_key: str) -> web.Response:
    """The answer to a create call the upstream did not start an event stream for: a missing
    /v1/responses is a 502 of ours; any other refusal (400, 401, 429, ...) is relayed with
    its status and error object, as the relay does."""
    error = await error_object(resp, api_key)
    if resp.status == 200:
        raise UpstreamError(
            f"upstream {name} answered a stream request with {resp.content_type!r}, not events",
            code="bad_upstream_response",
        )
    if resp.status in (404, 405, 501):
        raise UpstreamError(
            f"upstream {name} does not serve /v1/responses (it answered {resp.status}): "
            "background responses need it",
            code="responses_unsupported",
        )
    body = error or error_body(
        f"upstream answered {resp.status}", "upstream_error", "bad_gateway"
    )
    return web.Response(
        status=resp.status,
        body=body,
        headers=relay_headers(resp.headers, resp.status),
        content_type="application/json",
    )


async def _owned(request: web.Request) -> tuple[str, objects.Json]:
    """The id and Response-as-created of the caller's own response; 404 for anything else."""
    response_id = request.match_info["id"]
    if not _ID.fullmatch(response_id):
        raise _unknown()
    head = await request.app[EVENT_LOG].read(response_id, 0, timeout=0, limit=1)
    meta = None if head is None or not head.events else objects.read_meta(head.events[0])
    identity = request.get(IDENTITY)
    client = identity.client if identity is not None else "anonymous"
    if meta is None or meta[0] != client:
        raise _unknown()
    return response_id, meta[1]


async def _state(request: web.Request, response_id: str, base: objects.Json) -> objects.Json:
    """The Response now: as created while running; once ended, from the log's last event."""
    events = request.app[EVENT_LOG]
    probe = await events.read(response_id, _END_PROBE, timeout=0, limit=1)
    if probe is None:
        raise _unknown()
    if not probe.ended:
        return base
    last, after = None, 1
    while True:  # read through to the last event (once, after the end: then it is final)
        batch = await events.read(response_id, after, timeout=0, limit=_READ_LIMIT)
        if batch is None:
            raise _unknown()
        if batch.events:
            last, after = batch.events[-1], batch.events[-1].id
        if batch.ended or not batch.events:
            break
    return base if last is None else objects.settled(base, last)


def _starting_after(request: web.Request) -> int:
    raw = request.query.get("starting_after", "")
    if raw == "":
        return -1
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 15:
        raise BadRequest(
            "starting_after must be a sequence number (a non-negative integer)",
            code="invalid_starting_after",
        )
    return int(raw)


async def _follow(
    request: web.Request, response_id: str, base: objects.Json, after: int
) -> web.StreamResponse:
    # Each reader holds a blocking read (with Redis, a connection of the bounded pool): the
    # same per-instance cap as the readers of /v1/streams.
    with request.app[FOLLOWERS].hold():
        return await _serve(request, response_id, base, after)


async def _serve(
    request: web.Request, response_id: str, base: objects.Json, after: int
) -> web.StreamResponse:
    """The events after `after`, then live; the caller holds a reader's place."""
    batch: Batch | None = await request.app[EVENT_LOG].read(
        response_id, after, timeout=0, limit=_READ_LIMIT
    )
    if batch is None:
        raise _unknown()
    return await serve_log(
        request, response_id, after, batch, lambda evs: objects.encode(evs, base)
    )


async def retrieve(request: web.Request) -> web.StreamResponse:
    """GET /v1/responses/{id}: the Response, or with ?stream=true its events."""
    after = _starting_after(request)  # checked first: a bad query is 400 for any id
    response_id, base = await _owned(request)
    if request.query.get("stream", "").lower() == "true":
        return await _follow(request, response_id, base, after + objects.FIRST)
    return _json(await _state(request, response_id, base))


async def cancel(request: web.Request) -> web.Response:
    """POST /v1/responses/{id}/cancel: end the log (the owner stops); the Response."""
    response_id, base = await _owned(request)
    await request.app[EVENT_LOG].cancel(response_id)
    return _json(await _state(request, response_id, base))


async def delete(request: web.Request) -> web.Response:
    """DELETE /v1/responses/{id}: cancel it if running, and forget it."""
    response_id, _ = await _owned(request)
    await request.app[EVENT_LOG].delete(response_id)
    return web.Response(body=objects.deleted(response_id), content_type="application/json")
