"""Tracing, outermost: request id, W3C trace context, and the one access-log line.

The access line is written when the response has really ended: after the handler returned
(a stream handler returns after its last byte) or when it was cancelled by a disconnect.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..exchange import Exchange
from ..logs import loggable_path
from ..state import EXCHANGE, FINISHED, STARTED
from .headers import apply_response_headers

if TYPE_CHECKING:
    from ..otel import Tracing

access_log = structlog.get_logger("gateway.access")
log = structlog.get_logger("gateway.tracing")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# https://www.w3.org/TR/trace-context/#traceparent-header-field-values
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def _trace(header: str | None, fresh: str) -> tuple[str, str | None, str]:
    """(trace_id, parent span id, flags): continued from a valid traceparent, else a new
    trace (no parent) with `fresh` (32 random hex digits) as its id."""
    if header:
        m = _TRACEPARENT.fullmatch(header.strip())
        if m and m.group(1) != _ZERO_TRACE and m.group(2) != _ZERO_SPAN:
            return m.group(1), m.group(2), m.group(3)
    return fresh, None, "01"


def make_tracing_middleware(otel: Tracing | None = None) -> Middleware:
    """`otel`: the span exporter when `[tracing]` is on (its SERVER span takes the ids below)."""

    @web.middleware
    async def tracing(request: web.Request, handler: Handler) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        # A request id, a trace id and a span id from one read of the OS's randomness.
        fresh = os.urandom(40).hex()
        rid = request.headers.get("X-Request-ID")
        if rid is None or not _REQUEST_ID.fullmatch(rid):
            rid = fresh[:32]
        trace_id, parent_id, flags = _trace(request.headers.get("traceparent"), fresh[32:64])
        ex = Exchange(
            request_id=rid,
            trace_id=trace_id,
            span_id=fresh[64:],
            trace_flags=flags,
            started=loop.time(),
            parent_id=parent_id,
        )
        if otel is not None:
            otel.request(request, ex)
        request[EXCHANGE] = ex
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            request_id=rid, trace_id=trace_id, span_id=ex.span_id
        )
        try:
            response = await handler(request)
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            # The client went away: cancelled by aiohttp, or a write found the socket closed.
            if ex.outcome == "completed" and not ex.delivered:
                ex.outcome = "client_disconnected"
            ex.status = ex.status or 499
            _finish(request, ex, loop.time())
            if isinstance(exc, ConnectionResetError) and _client_gone(request):
                # aiohttp logs any exception out of a handler with its traceback ("Error
                # handling request"): a normal disconnect is answered instead. aiohttp's
                # finishing write then finds the socket closed and drops the connection
                # quietly, as it does for a disconnect that cancelled the handler.
                return request.get(STARTED) or web.Response(status=499)
            raise
        except BaseException:
            ex.status = ex.status or 500
            if ex.outcome == "completed":
                ex.outcome = "upstream_error"
            _finish(request, ex, loop.time())
            raise
        ex.status = response.status
        if ex.ttfb is None:
            ex.ttfb = loop.time()
        if response.status >= 400 and ex.outcome == "completed":
            ex.outcome = "rejected" if response.status < 500 else (
                "timeout" if response.status == 504 else "upstream_error"
            )
        _finish(request, ex, loop.time())
        return response

    return tracing


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, streamed or not, carries X-Request-ID (set right before headers go),
    then the headers the middlewares asked for (`headers.add_response_headers`): one hook,
    so one coroutine per response rather than two."""
    ex = request.get(EXCHANGE)
    if ex is not None:
        response.headers["X-Request-ID"] = ex.request_id
    apply_response_headers(request, response)
    request[STARTED] = response  # last: the headers go right after this hook


def _client_gone(request: web.Request) -> bool:
    """The client's connection is closed or closing (a write to it raised)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _finish(request: web.Request, ex: Exchange, now: float) -> None:
    """The one place an exchange finishes: the access line, then the app's finish hooks
    (metrics, usage accounting). It may run in a cancelled handler: nothing here awaits."""
    _log(request, ex, now)
    for hook in request.app.get(FINISHED, ()):
        try:
            hook(request, ex, now)
        except Exception:
            log.exception("finish_hook_failed", hook=getattr(hook, "__qualname__", repr(hook)))


def _log(request: web.Request, ex: Exchange, now: float) -> None:
    usage = ex.usage
    access_log.info(
        "access",
        method=request.method,
        path=loggable_path(request.path),
        ip=ex.ip,
        client=ex.client,
        model=ex.model,
        stream=ex.stream,
        status=ex.status,
        outcome=ex.outcome,
        ttfb_ms=round((ex.ttfb - ex.started) * 1000, 3) if ex.ttfb is not None else None,
        duration_ms=round((now - ex.started) * 1000, 3),
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        upstream=ex.upstream,
        attempts=ex.attempts,
        throttled=ex.reason,
    )
