"""A generation the gateway owns (a detached stream, a background response): its task's life.

Both kinds run the same way and differ only in their work (what they parse, how their log's
events look): `run` races the work against its log ending under it (a DELETE or a cancel from
any instance, or the log's bound), turns a crash and the app's shutdown into the log's last
event, and `settle`s exactly once whatever happened: the span ends, the concurrency slot goes
back, and the tokens reach `gateway_tokens_total`, the usage store and the client's tpm
budget, then one log line (`<name>_ended`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from ..exchange import Exchange
from ..identity import Identity
from ..limits import LIMITER
from ..metrics import METRICS
from ..middlewares.throttle import charge_tokens
from ..state import Slot
from ..usage import USAGE
from .log import EVENT_LOG

log = structlog.get_logger("gateway.streams")

# Writes the log's last event for a failure the work did not see: (message, type, code).
Fail = Callable[[str, str, str], Awaitable[None]]


@dataclass(slots=True)
class Owned:
    """Who a generation works for, and what it holds until it ends."""

    log_id: str
    client: str
    identity: Identity | None  # for tpm: the tokens are charged when the usage is known
    ex: Exchange  # the generation's own record (model, upstream, attempts, usage)
    slot: Slot | None


class Ended(Exception):
    """The log refused an append: cancelled, deleted, or over its bound."""


async def run(
    app: web.Application,
    owned: Owned,
    work: Coroutine[Any, Any, str],
    fail: Fail,
    *,
    name: str,
    release: Callable[[], None] | None = None,
) -> None:
    """Run `work` (which returns the outcome) until it ends, the log ends, or the app stops.

    `release` frees what the work was handed before it started (an upstream response already
    open): called whatever happens, even when `work` is cancelled before its first step.
    """
    # This task's lines lead to the generation's span (its own trace when tracing is on).
    structlog.contextvars.bind_contextvars(trace_id=owned.ex.trace_id, span_id=owned.ex.span_id)
    ended = asyncio.ensure_future(app[EVENT_LOG].wait_ended(owned.log_id))
    task = asyncio.ensure_future(work)
    outcome = "completed"
    try:
        await asyncio.wait({ended, task}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # the log ended under us: a DELETE or cancel (or expiry)
            outcome = "cancelled"
            task.cancel()
        try:
            outcome = await task
        except asyncio.CancelledError:
            pass
        except Ended:
            outcome = "log_ended"  # over its bound (or cancelled between two appends)
        except Exception:
            outcome = "error"
            log.exception(f"{name}_failed")
            await fail("Internal server error", "server_error", "internal_error")
    except asyncio.CancelledError:  # the app is stopping
        outcome = "shutdown"
        task.cancel()
        # Whatever the work ended with (a crash already logged above, say), the log still
        # gets its last event.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await fail("The gateway is shutting down", "service_unavailable", "shutdown")
        raise
    finally:
        ended.cancel()
        if release is not None:
            release()
        # The app's stop cancels this task even while it settles (each step a Redis round
        # trip): cut short, the slot would stay held and the tokens go uncharged. Settling
        # runs to its end; a cancel that came meanwhile is raised after it.
        settling = asyncio.ensure_future(settle(app, owned, outcome, name))
        try:
            await asyncio.shield(settling)
        except asyncio.CancelledError:
            await settling
            raise


async def settle(app: web.Application, owned: Owned, outcome: str, name: str) -> None:
    """The generation has ended: give back what it held and charge what it cost."""
    ex = owned.ex
    if ex.otel is not None:  # first: nothing below may keep the span from ending
        ex.otel.finish(ex, outcome)
    if owned.slot is not None:
        await owned.slot.release()
    usage = ex.usage
    if usage is not None and METRICS in app:
        app[METRICS].charge(owned.client, usage)  # first: it cannot fail, the store can
    if USAGE in app:
        await app[USAGE].record(owned.client, usage, streamed=True)
    if owned.identity is not None and usage is not None and LIMITER in app:
        await charge_tokens(app, owned.identity, usage.total_tokens)
    log.info(
        f"{name}_ended",
        **{f"{name}_outcome": outcome},
        client=owned.client,
        model=ex.model,
        upstream=ex.upstream,
        attempts=ex.attempts,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
    )
