"""One detached generation: a chat completion streamed from upstream into an event log.

The task is owned by the app (see `registry`), not by the request that started it, so it
goes on with no reader attached. It turns each upstream chunk into log events:

    delta   the chunk's non-empty `choices[0].delta`, as JSON
    usage   the usage object, whenever the upstream gives one
    done    {"finish_reason": ...}, last, after `data: [DONE]`
    fail    {"error": {...}}, last, when the upstream failed or the gateway stopped

It stops (closing the upstream connection) when the log ends under it: a DELETE from any
process (`EventLog.cancel`), or the log's bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict

from ..errors import GatewayError, error_body
from ..exchange import Exchange
from ..identity import Identity
from ..limits import LIMITER
from ..middlewares.throttle import charge_tokens
from ..sse import EventSplitter, SSEError, iter_events, parse_event
from ..state import CONFIG, Slot
from ..upstream.pool import UPSTREAMS, read_to_end
from ..usage import USAGE
from ..usage.tap import Usage
from .log import DELTA, DONE, EVENT_LOG, FAIL, EventLog
from .log import USAGE as USAGE_EVENT

log = structlog.get_logger("gateway.streams")

# The largest upstream error body read to find its message.
_MAX_ERROR_BYTES = 64 << 10


@dataclass(slots=True)
class Job:
    """What a generation needs from the request that started it."""

    stream_id: str
    client: str
    identity: Identity | None  # for tpm: the tokens are charged when usage arrives
    body: bytes  # the chat request, `stream` and usage already asked for
    ex: Exchange  # the generation's own record (model, upstream, attempts, usage)
    headers: CIMultiDict[str]
    slot: Slot | None


class _Ended(Exception):
    """The log refused an append: cancelled, or over its bound."""


def _fail(message: str, type_: str, code: str) -> str:
    return error_body(message, type_, code).decode()


async def run(app: web.Application, job: Job) -> None:
    """Generate into the log until done, failed, cancelled, or the app stops."""
    events = app[EVENT_LOG]
    ended = asyncio.ensure_future(events.wait_ended(job.stream_id))
    work = asyncio.ensure_future(_generate(app, events, job))
    outcome = "completed"
    try:
        await asyncio.wait({ended, work}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the log ended under us: DELETE (or expiry)
            outcome = "cancelled"
            work.cancel()
        try:
            outcome = await work
        except asyncio.CancelledError:
            pass
        except _Ended:
            outcome = "log_ended"  # over its bound (or cancelled between two appends)
        except Exception:
            outcome = "error"
            log.exception("stream_failed")
            await events.append(
                job.stream_id,
                FAIL,
                _fail("Internal server error", "server_error", "internal_error"),
            )
    except asyncio.CancelledError:  # the app is stopping
        outcome = "shutdown"
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, _Ended):
            await work
        await events.append(
            job.stream_id,
            FAIL,
            _fail("The gateway is shutting down", "service_unavailable", "shutdown"),
        )
        raise
    finally:
        ended.cancel()
        await _finish(app, job, outcome)


async def _finish(app: web.Application, job: Job, outcome: str) -> None:
    if job.slot is not None:
        await job.slot.release()
    usage = job.ex.usage
    if USAGE in app:
        await app[USAGE].record(job.client, usage, streamed=True)
    if job.identity is not None and usage is not None and LIMITER in app:
        await charge_tokens(app, job.identity, usage.total_tokens)
    log.info(
        "stream_ended",
        stream_outcome=outcome,
        client=job.client,
        model=job.ex.model,
        upstream=job.ex.upstream,
        attempts=job.ex.attempts,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
    )


async def _generate(app: web.Application, events: EventLog, job: Job) -> str:
    sid = job.stream_id

    async def put(kind: str, data: str) -> None:
        if await events.append(sid, kind, data) is None:
            raise _Ended

    try:
        _, resp = await app[UPSTREAMS].open(
            "POST", "/chat/completions", ex=job.ex, body=job.body, headers=job.headers
        )
    except GatewayError as exc:
        await put(FAIL, exc.body().decode())
        return "upstream_error"
    try:
        if resp.status != 200 or resp.content_type != "text/event-stream":
            await put(FAIL, await _error_of(resp))
            return "upstream_error"
        return await _pump(app, resp, job, put)
    finally:
        if not resp.content.at_eof():
            resp.close()  # drop the connection: the upstream stops generating
        resp.release()


Put = Callable[[str, str], Awaitable[None]]


async def _pump(app: web.Application, resp: aiohttp.ClientResponse, job: Job, put: Put) -> str:
    splitter = EventSplitter(app[CONFIG].sse.max_event_bytes)
    finish: str | None = None
    try:
        while data := await resp.content.readany():
            for raw in iter_events(splitter.feed(data)):
                ev = parse_event(raw)
                if ev is None or ev.data is None:
                    continue
                if ev.data.strip() == "[DONE]":
                    await put(DONE, orjson.dumps({"finish_reason": finish}).decode())
                    return "completed"
                chunk = _json(ev.data)
                if chunk is None:
                    continue
                if "error" in chunk:
                    await put(FAIL, orjson.dumps({"error": chunk["error"]}).decode())
                    return "upstream_error"
                usage = Usage.from_obj(chunk.get("usage"))
                choice = _first_choice(chunk.get("choices"))
                if choice is not None:
                    delta = choice.get("delta")
                    if isinstance(delta, dict) and delta:
                        await put(DELTA, orjson.dumps(delta).decode())
                    if isinstance(choice.get("finish_reason"), str):
                        finish = choice["finish_reason"]
                if usage is not None:
                    job.ex.usage = usage
                    await put(USAGE_EVENT, orjson.dumps(chunk["usage"]).decode())
    except TimeoutError:
        await put(FAIL, _fail("upstream timed out", "timeout", "upstream_timeout"))
        return "timeout"
    except SSEError as exc:
        await put(FAIL, _fail(str(exc), "upstream_error", "event_too_large"))
        return "upstream_error"
    except aiohttp.ClientError:
        await put(
            FAIL, _fail("upstream connection lost", "upstream_error", "upstream_disconnected")
        )
        return "upstream_error"
    await put(FAIL, _fail("upstream ended the stream early", "upstream_error", "stream_truncated"))
    return "upstream_error"


def _json(text: str) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _first_choice(choices: object) -> dict[str, Any] | None:
    if isinstance(choices, list):
        for c in choices:
            if isinstance(c, dict) and c.get("index", 0) == 0:
                return c
    return None


async def _error_of(resp: aiohttp.ClientResponse) -> str:
    """The upstream's error object when it sent one, else a gateway-made one."""
    try:
        body = _json((await read_to_end(resp, _MAX_ERROR_BYTES)).decode(errors="replace"))
    except GatewayError:  # cut, timed out or over the cap: no message to pass on
        body = None
    if body is not None and isinstance(body.get("error"), dict):
        return orjson.dumps({"error": body["error"]}).decode()
    return _fail(f"upstream answered {resp.status}", "upstream_error", "bad_gateway")
