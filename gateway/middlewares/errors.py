"""Render every error as OpenAI-shaped JSON, or end a started stream with an error event.

aiohttp's own HTTP exceptions (unknown route, wrong method, body too large) are mapped onto
the gateway's error tree here, at one boundary; anything unexpected is logged with its
traceback and answered 500 without one.

Once a response has started (its headers are gone, `state.STARTED`), no error can be a
response of its own: a second status line would land inside the first response's body.
The stream is ended instead with one SSE error event and a clean end of the response.
"""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    sse_error_event,
)
from ..state import EXCHANGE, STARTED

log = structlog.get_logger("gateway.errors")

_BY_STATUS: dict[int, type[GatewayError]] = {
    400: BadRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
}


def _from_http(exc: web.HTTPException) -> GatewayError:
    cls = _BY_STATUS.get(exc.status, GatewayError)
    if exc.status == 404:
        return NotFound("Unknown route", code="unknown_route")
    if exc.status == 405:
        allowed = getattr(exc, "allowed_methods", ())
        err = MethodNotAllowed("Method not allowed")
        if allowed:
            err.headers["Allow"] = ", ".join(sorted(allowed))
        return err
    return cls(exc.reason)


def _as_gateway_error(exc: Exception) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return _from_http(exc)
    log.error("unhandled_error", exc_info=exc)
    return GatewayError("Internal server error", code="internal_error")


async def _end_started(
    request: web.Request, response: web.StreamResponse, exc: Exception
) -> web.StreamResponse:
    """One error event and the end of a response already under way; it is then returned
    (aiohttp's prepare and write_eof on a finished response are no-ops)."""
    err = _as_gateway_error(exc)
    ex = request.get(EXCHANGE)
    if ex is not None and ex.outcome == "completed":
        ex.outcome = "timeout" if err.status == 504 else "upstream_error"
    try:
        if response.content_type == "text/event-stream":
            await response.write(sse_error_event(err.message, err.type, err.code))
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the client is gone, or the response had already ended: nothing more to send
    if response.content_type != "text/event-stream":
        response.force_close()  # a cut body of another kind: the connection must not be reused
    return response


def make_errors_middleware() -> Middleware:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConnectionResetError:
            raise  # the client is gone: nothing to answer
        except web.HTTPException as exc:
            started = request.get(STARTED)
            if started is not None:
                return await _end_started(request, started, exc)
            if exc.status < 400:  # redirects and the like are answers, not errors
                raise
            return _from_http(exc).response()
        except Exception as exc:
            started = request.get(STARTED)
            if started is not None:
                return await _end_started(request, started, exc)
            return _as_gateway_error(exc).response()

    return errors
