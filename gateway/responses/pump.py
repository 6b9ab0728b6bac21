"""One background response: the upstream's Responses event stream pumped into its log.

The task is owned by the app (`streams.registry.STREAM_TASKS`), like a detached stream's
generation, so it goes on with no reader attached. It is handed the upstream's answer
already open (200, an event stream: the create call waited for it), and writes each upstream
event into the log as `objects` lays it out, until the upstream's final event
(response.completed / incomplete / failed). A failure on the way (upstream error event, cut
connection, timeout, the gateway stopping) ends the log with OpenAI's `response.failed`.

It stops (closing the upstream connection: the upstream stops generating) when the log ends
under it: a cancel or delete from any instance (`EventLog.wait_ended`), or the log's bound.

Kept apart from `streams.generation` (chat chunks into delta/usage/done events) on purpose:
the two differ in what they parse, not in how they run; both belong on one streaming core.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from ..exchange import Exchange
from ..identity import Identity
from ..limits import LIMITER
from ..metrics import METRICS
from ..middlewares.throttle import charge_tokens
from ..sse import EventSplitter, SSEError, iter_events, parse_event
from ..state import CONFIG, Slot
from ..streams.log import DONE, EVENT_LOG, FAIL, EventLog
from ..usage import USAGE
from ..usage.tap import Usage
from . import objects

log = structlog.get_logger("gateway.responses")


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
    seq: int = 0  # the next event's sequence number
    deltas: int = 0  # output_text deltas logged: the usage of a response cut short


class _Ended(Exception):
    """The log refused an append: cancelled, deleted, or over its bound."""


async def run(app: web.Application, job: Job) -> None:
    """Pump into the log until the upstream's final event, a failure, a cancel, or shutdown."""
    events = app[EVENT_LOG]
    ended = asyncio.ensure_future(events.wait_ended(job.response_id))
    work = asyncio.ensure_future(_pump(app, events, job))
    outcome = "completed"
    try:
        await asyncio.wait({ended, work}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the log ended under us: cancel, delete (or expiry)
            outcome = "cancelled"
            work.cancel()
        try:
            outcome = await work
        except asyncio.CancelledError:
            pass
        except _Ended:
            outcome = "log_ended"
        except Exception:
            outcome = "error"
            log.exception("response_failed")
            await _fail_response(events, job, "Internal server error", "internal_error")
    except asyncio.CancelledError:  # the app is stopping
        outcome = "shutdown"
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, _Ended):
            await work
        await _fail_response(events, job, "The gateway is shutting down", "shutdown")
        raise
    finally:
        ended.cancel()
        if not job.resp.content.at_eof():
            job.resp.close()  # drop the connection: the upstream stops generating
        job.resp.release()
        await _finish(app, job, outcome)


async def _fail_response(events: EventLog, job: Job, message: str, code: str) -> None:
    error = {"code": code, "message": message}
    await events.append(job.response_id, FAIL, objects.failed_event(job.base, job.seq, error))


async def _finish(app: web.Application, job: Job, outcome: str) -> None:
    if job.slot is not None:
        await job.slot.release()
    usage = job.ex.usage
    if usage is None and job.deltas:
        # Cut before the upstream's usage: charge the deltas logged, about a token each.
        usage = job.ex.usage = Usage(completion_tokens=job.deltas, total_tokens=job.deltas)
    if usage is not None and METRICS in app:
        app[METRICS].charge(job.client, usage)  # first: it cannot fail, the store can
    if USAGE in app:
        await app[USAGE].record(job.client, usage, streamed=True)
    if job.identity is not None and usage is not None and LIMITER in app:
        await charge_tokens(app, job.identity, usage.total_tokens)
    log.info(
        "response_ended",
        response_outcome=outcome,
        client=job.client,
        model=job.ex.model,
        upstream=job.ex.upstream,
        attempts=job.ex.attempts,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
    )


async def _pump(app: web.Application, events: EventLog, job: Job) -> str:
    async def put(kind: str, data: str) -> None:
        if await events.append(job.response_id, kind, data) is None:
            raise _Ended
        job.seq += 1

    async def fail(error: object) -> None:
        await put(FAIL, objects.failed_event(job.base, job.seq, error))

    async def take(raw: bytes) -> str | None:
        """Log one upstream event; the outcome when it was the last."""
        ev = parse_event(raw)
        obj = None if ev is None or ev.data is None else _json(ev.data)
        if obj is None:
            return None  # a comment, `[DONE]`, or not JSON
        type_ = objects.event_type(obj, ev.event if ev else None)
        if type_ is None or type_ == "error":  # OpenAI's stream error: {"type": "error", ...}
            if type_ is None and "error" not in obj:
                return None
            await fail(obj.get("error", obj))
            return "upstream_error"
        final = objects.TERMINAL.get(type_)
        if final is not None:
            response = obj.get("response")
            if isinstance(response, dict):
                job.ex.usage = Usage.from_obj(response.get("usage"))
            await put(final, objects.ours(obj, type_, job.seq, job.base))
            return "completed" if final == DONE else "upstream_error"
        if type_ == "response.output_text.delta":
            job.deltas += 1
        await put(type_, objects.ours(obj, type_, job.seq, job.base))
        return None

    splitter = EventSplitter(app[CONFIG].sse.max_event_bytes)
    try:
        while data := await job.resp.content.readany():
            for raw in iter_events(splitter.feed(data)):
                if (outcome := await take(raw)) is not None:
                    return outcome
        # The upstream's last event may lack its blank line: complete it rather than drop it.
        if (rest := splitter.flush()).strip() and (outcome := await take(rest)) is not None:
            return outcome
    except TimeoutError:
        await fail({"code": "upstream_timeout", "message": "upstream timed out"})
        return "timeout"
    except SSEError as exc:
        await fail({"code": "event_too_large", "message": str(exc)})
        return "upstream_error"
    except aiohttp.ClientError:
        await fail({"code": "upstream_disconnected", "message": "upstream connection lost"})
        return "upstream_error"
    await fail({"code": "stream_truncated", "message": "upstream ended the stream early"})
    return "upstream_error"


def _json(text: str) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
