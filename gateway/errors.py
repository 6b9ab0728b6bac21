"""The gateway's one error tree, rendered as OpenAI-shaped JSON.

    GatewayError                      status  type
     ├── BadRequest                    400    invalid_request_error
     ├── Unauthorized                  401    authentication_error   (+ WWW-Authenticate)
     ├── Forbidden                     403    permission_error
     ├── NotFound                      404    not_found_error
     ├── MethodNotAllowed              405    invalid_request_error
     ├── RequestTimeout                408    invalid_request_error
     ├── PayloadTooLarge               413    invalid_request_error
     ├── UnsupportedMediaType          415    invalid_request_error
     ├── RateLimited                   429    rate_limit_error       (+ Retry-After)
     ├── UpstreamError                 502    upstream_error
     ├── Unavailable                   503    service_unavailable
     └── UpstreamTimeout               504    timeout

Foreign errors (aiohttp's client and server exceptions) are mapped onto this tree at one
boundary each: `gateway.upstream.pool` for the client side, `gateway.middlewares.errors` for the
server side. Before `prepare()` an error becomes a JSON response; after it, one SSE error
event (`sse_error_event`) and a clean end of the response.
"""

from __future__ import annotations

import math
from typing import ClassVar

import orjson
from aiohttp import web


def error_body(message: str, type_: str, code: str | None = None) -> bytes:
    """The OpenAI error object: `{"error": {"message", "type", "code"}}`."""
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code}})


def retry_after_value(seconds: float) -> str:
    """A Retry-After the gateway sends: whole seconds, at least 1 (RFC 9110 10.2.3 allows
    no fraction; 0 would have a client retry at once)."""
    return str(max(1, math.ceil(seconds)))


class GatewayError(Exception):
    """An error the gateway itself answers; carries status, OpenAI type and code."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers=self.headers,
        )


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, retry_after: float, headers: dict[str, str] | None = None
    ) -> None:
        hdrs = {"Retry-After": retry_after_value(retry_after)}
        hdrs.update(headers or {})
        super().__init__(message, headers=hdrs)
        self.retry_after = retry_after


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    default_code = "bad_gateway"


class Unavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout"
    default_code = "upstream_timeout"


def sse_error_event(message: str, type_: str, code: str | None = None) -> bytes:
    """The event that ends a relayed stream which failed after its first byte."""
    return b"data: " + error_body(message, type_, code) + b"\n\n"
