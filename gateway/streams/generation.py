"""One detached generation: a chat completion streamed from upstream into an event log.

The task is owned by the app (see `registry`), not by the request that started it, so it
goes on with no reader attached. It turns each upstream chunk into log events:

    delta   the chunk's non-empty `choices[0].delta`, as JSON
    usage   the usage object, whenever the upstream gives one
    done    {"finish_reason": ...}, last, after `data: [DONE]`
    fail    {"error": {...}}, last, when the upstream failed or the gateway stopped

The reading, splitting, failure mapping and usage estimate are `gateway.streaming.Pump`'s,
the relay's own core; this module adds the sink that turns events into log entries. It stops
(closing the upstream connection) when the log ends under it: a DELETE from any process
(`EventLog.cancel`), or the log's bound. Its tokens are accounted like a relayed request's:
`/v1/usage`, tpm and `gateway_tokens_total`.
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
from ..metrics import METRICS
from ..middlewares.throttle import charge_tokens
from ..sse import iter_events, parse_event
from ..state import CONFIG, Slot
from ..streaming import Failure, Pump, SinkFailed
from ..upstream.pool import UPSTREAMS, read_to_end, scrub_key
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


class _Completed(Exception):
    """`data: [DONE]` is in the log as `done`: the generation is over."""


def _fail(message: str, type_: str, code: str) -> str:
    return error_body(message, type_, code).decode()


async def run(app: web.Application, job: Job) -> None:
    """Generate into the log until done, failed, cancelled, or the app stops."""
    # This task's lines lead to the generation's span (its own trace when tracing is on).
    structlog.contextvars.bind_contextvars(trace_id=job.ex.trace_id, span_id=job.ex.span_id)
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
    if job.ex.otel is not None:  # first: nothing below may keep the span from ending
        job.ex.otel.finish(job.ex, outcome)
    if job.slot is not None:
        await job.slot.release()
    usage = job.ex.usage
    if usage is not None and METRICS in app:
        app[METRICS].charge(job.client, usage)  # first: it cannot fail, the store can
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
        up, resp = await app[UPSTREAMS].open(
            "POST", "/chat/completions", ex=job.ex, body=job.body, headers=job.headers
        )
    except GatewayError as exc:
        await put(FAIL, exc.body().decode())
        return "upstream_error"
    try:
        if resp.status != 200 or resp.content_type != "text/event-stream":
            await put(FAIL, await _error_of(resp, up.cfg.api_key))
            return "upstream_error"
        pump = Pump(app[CONFIG].sse.max_event_bytes, strip=False, require_done=True)
        otel = job.ex.otel
        sink = _LogSink(put, otel.response if otel is not None else None)
        try:
            outcome = await pump.run(resp, sink)
        except _Completed:
            return "completed"
        finally:
            job.ex.usage = pump.usage  # the upstream's, else what was delivered
        if outcome == "completed":
            await sink.done()  # a [DONE] the sink did not read as one (a multi-line event)
        return outcome
    finally:
        if not resp.content.at_eof():
            resp.close()  # drop the connection: the upstream stops generating
        resp.release()


Put = Callable[[str, str], Awaitable[None]]


class _LogSink:
    """The generation's `streaming.Sink`: each upstream chunk becomes log events."""

    __slots__ = ("_finish", "_put", "_seen", "ended")

    def __init__(self, put: Put, seen: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._put = put
        self._seen = seen  # each chunk parsed (the generation's span notes its id, model)
        self._finish: str | None = None  # the last finish_reason of choice 0
        self.ended = False  # the final event (done or fail) is in the log

    async def send(self, block: bytes) -> None:
        if self.ended:
            return  # nothing goes after the final event
        put = self._put
        for raw in iter_events(block):
            ev = parse_event(raw)
            if ev is None or ev.data is None:
                continue
            if ev.data.rstrip(" \t") == "[DONE]":
                await self.done()
                raise _Completed  # stop now: the log has ended, its readers are told
            chunk = _json(ev.data)
            if chunk is None:
                continue
            if "error" in chunk:
                error = orjson.dumps({"error": chunk["error"]})
                raise SinkFailed(Failure("upstream_error", error))
            if self._seen is not None:
                self._seen(chunk)
            usage = Usage.from_obj(chunk.get("usage"))
            choice = _first_choice(chunk.get("choices"))
            if choice is not None:
                delta = choice.get("delta")
                if isinstance(delta, dict) and delta:
                    await put(DELTA, orjson.dumps(delta).decode())
                if isinstance(choice.get("finish_reason"), str):
                    self._finish = choice["finish_reason"]
            if usage is not None:
                await put(USAGE_EVENT, orjson.dumps(chunk["usage"]).decode())

    async def done(self) -> None:
        """End the log with `done` (once)."""
        if not self.ended:
            self.ended = True
            await self._put(DONE, orjson.dumps({"finish_reason": self._finish}).decode())

    async def fail(self, failure: Failure) -> None:
        if not self.ended:
            self.ended = True
            await self._put(FAIL, failure.body.decode())


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


async def _error_of(resp: aiohttp.ClientResponse, api_key: str) -> str:
    """The upstream's error object when it sent one, else a gateway-made one. Some upstreams
    quote the credential they were sent: the upstream's key is scrubbed, as the relay does."""
    try:
        body = _json((await read_to_end(resp, _MAX_ERROR_BYTES)).decode(errors="replace"))
    except GatewayError:  # cut, timed out or over the cap: no message to pass on
        body = None
    if body is not None and isinstance(body.get("error"), dict):
        return scrub_key(orjson.dumps({"error": body["error"]}), api_key).decode()
    return _fail(f"upstream answered {resp.status}", "upstream_error", "bad_gateway")
