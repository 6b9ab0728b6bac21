"""Render every error raised before a response started as OpenAI-shaped JSON.

aiohttp's own HTTP exceptions (unknown route, wrong method, body too large) are mapped onto
the gateway's error tree here, at one boundary; anything unexpected is logged with its
traceback and answered 500 without one.
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
)

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


def make_errors_middleware() -> Middleware:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:  # redirects and the like are answers, not errors
                raise
            return _from_http(exc).response()
        except (ConnectionError, TimeoutError) as exc:
            if isinstance(exc, ConnectionResetError):
                raise  # the client is gone: nothing to answer
            log.error("unhandled_error", exc_info=True)
            return GatewayError("Internal server error").response()
        except Exception:
            log.error("unhandled_error", exc_info=True)
            return GatewayError("Internal server error").response()

    return errors
