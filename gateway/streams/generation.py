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
from ..sse import iter_events, parse_event
from ..state import CONFIG, Slot
from ..streaming import Failure, Pump, SinkFailed, json_object
from ..upstream.pool import UPSTREAMS, error_object
from ..usage.tap import Usage, first_choice
from . import owner
from .log import DELTA, DONE, EVENT_LOG, FAIL, EventLog
from .log import USAGE as USAGE_EVENT
from .owner import Ended, Owned

log = structlog.get_logger("gateway.streams")



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


def _fail(message: str, type_: str, code: str) -> str:
    return error_body(message, type_, code).decode()


class _Completed(Exception):
    """`data: [DONE]` is in the log as `done`: the generation is over."""


async def run(app: web.Application, job: Job) -> None:
    """Generate into the log until done, failed, cancelled, or the app stops."""
    events = app[EVENT_LOG]

    async def fail(message: str, type_: str, code: str) -> None:
        await events.append(job.stream_id, FAIL, _fail(message, type_, code))

    owned = Owned(job.stream_id, job.client, job.identity, job.ex, job.slot)
    await owner.run(app, owned, _generate(app, events, job), fail, name="stream")


async def _generate(app: web.Application, events: EventLog, job: Job) -> str:
    sid = job.stream_id

    async def put(kind: str, data: str) -> None:
        if await events.append(sid, kind, data) is None:
            raise Ended

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
            chunk = json_object(ev.data)
            if chunk is None:
                continue
            if "error" in chunk:
                error = orjson.dumps({"error": chunk["error"]})
                raise SinkFailed(Failure("upstream_error", error))
            if self._seen is not None:
                self._seen(chunk)
            usage = Usage.from_obj(chunk.get("usage"))
            choice = first_choice(chunk.get("choices"))
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



async def _error_of(resp: aiohttp.ClientResponse, api_key: str) -> str:
    """The upstream's error object when it sent one, else a gateway-made one."""
    error = await error_object(resp, api_key)
    if error is not None:
        return error.decode()
    return _fail(f"upstream answered {resp.status}", "upstream_error", "bad_gateway")
