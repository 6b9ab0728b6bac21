"""One background response: the upstream's Responses event stream pumped into its log.

The task is owned by the app (`streams.registry.STREAM_TASKS`) and runs as every generation
the gateway owns does (`streams.owner`: cancel, shutdown, slot, tokens), so it goes on with no
reader attached. It is handed the upstream's answer already open (200, an event stream: the
create call waited for it). The reading, splitting and failure mapping are the streaming
core's (`gateway.streaming.Pump`, as for the relay and detached streams); this module adds
the sink that writes each upstream event into the log as `objects` lays it out, until the
upstream's final event (response.completed / incomplete / failed). A failure on the way
(an upstream error event, a cut connection, a timeout, a close before the final event, the
gateway stopping) ends the log with OpenAI's `response.failed`.

It stops (closing the upstream connection: the upstream stops generating) when the log ends
under it: a cancel or delete from any instance (`EventLog.wait_ended`), or the log's bound.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from ..exchange import Exchange
from ..identity import Identity
from ..sse import iter_events, parse_event
from ..state import CONFIG, Slot
from ..streaming import TRUNCATED, Failure, Pump, SinkFailed, json_object
from ..streams import owner
from ..streams.log import DONE, EVENT_LOG, FAIL
from ..streams.owner import Ended, Owned
from ..usage.tap import Usage
from . import objects


@dataclass(slots=True)
class Job:
    """A background response being generated."""

    response_id: str
    client: str
    identity: Identity | None  # for tpm: the tokens are charged when the usage is known
    base: objects.Json  # the Response as created
    ex: Exchange  # the generation's own record (model, upstream, attempts, usage)
    resp: aiohttp.ClientResponse  # the upstream's answer: 200, an event stream
    slot: Slot | None


async def run(app: web.Application, job: Job) -> None:
    """Pump into the log until the upstream's final event, a failure, a cancel, or shutdown."""
    events = app[EVENT_LOG]

    async def put(kind: str, data: str) -> None:
        if await events.append(job.response_id, kind, data) is None:
            raise Ended

    sink = _ResponseSink(job.base, put)

    async def fail(message: str, _type: str, code: str) -> None:
        await events.append(
            job.response_id, FAIL, objects.failed_event(job.base, sink.seq, _error(code, message))
        )

    def release() -> None:
        if not job.resp.content.at_eof():
            job.resp.close()  # drop the connection: the upstream stops generating
        job.resp.release()

    owned = Owned(job.response_id, job.client, job.identity, job.ex, job.slot)
    await owner.run(app, owned, _pump(app, job, sink), fail, name="response", release=release)


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


class _Final(Exception):
    """The upstream's final event is in the log: the response is over."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


Put = Callable[[str, str], Awaitable[None]]


class _ResponseSink:
    """The background response's `streaming.Sink`: each upstream event, numbered and made
    ours, becomes a log event; the final one ends the log."""

    __slots__ = ("_base", "_put", "deltas", "ended", "seq")

    def __init__(self, base: objects.Json, put: Put) -> None:
        self._base = base
        self._put = put
        self.seq = 0  # the next event's sequence number
        self.deltas = 0  # output_text deltas logged: the usage of a response cut short
        self.ended = False

    async def _log(self, kind: str, data: str) -> None:
        await self._put(kind, data)
        self.seq += 1

    async def send(self, block: bytes) -> None:
        for raw in iter_events(block):
            ev = parse_event(raw)
            obj = None if ev is None or ev.data is None else json_object(ev.data)
            if obj is None:
                continue  # a comment, `[DONE]`, or not JSON
            type_ = objects.event_type(obj, ev.event if ev else None)
            if type_ is None or type_ == "error":  # OpenAI's stream error: {"type": "error"}
                if type_ is None and "error" not in obj:
                    continue
                error = obj.get("error", obj)
                raise SinkFailed(Failure("upstream_error", orjson.dumps({"error": error})))
            final = objects.TERMINAL.get(type_)
            if final is not None:
                self.ended = True
                await self._log(final, objects.ours(obj, type_, self.seq, self._base))
                raise _Final("completed" if final == DONE else "upstream_error")
            if type_ == "response.output_text.delta":
                self.deltas += 1
            await self._log(type_, objects.ours(obj, type_, self.seq, self._base))

    async def fail(self, failure: Failure) -> None:
        if self.ended:
            return
        self.ended = True
        error = orjson.loads(failure.body).get("error")
        await self._log(FAIL, objects.failed_event(self._base, self.seq, error))


async def _pump(app: web.Application, job: Job, sink: _ResponseSink) -> str:
    # The Responses API ends with its final event and a clean close, not `data: [DONE]`.
    pump = Pump(app[CONFIG].sse.max_event_bytes, strip=False, require_done=False)
    try:
        outcome: str = await pump.run(job.resp, sink)
        if not sink.ended:  # closed before the final event: the reader must not wait on
            await sink.fail(TRUNCATED)
            outcome = TRUNCATED.outcome
        return outcome
    except _Final as final:
        return final.outcome
    finally:
        # The upstream's usage (the pump's tap read it off the final event's `response`),
        # else about a token per text delta logged.
        n = sink.deltas
        usage = pump.tap.usage
        job.ex.usage = usage or (Usage(completion_tokens=n, total_tokens=n) if n else None)

