"""CORS: an exact-origin allow-list with headers precomputed in `gateway.policy.CORSPolicy`.

Sits outside the errors middleware, so a rendered 401/429 still carries the CORS headers a
browser needs to read it (and Retry-After, x-ratelimit-*). A preflight from an allowed origin
is answered 204 here and goes no further (no credentials are sent on a preflight); one from
any other origin is refused 403. A request (not a preflight) from an origin that is not
allowed is refused 403 too, before anything reaches the upstream: a simple request (a POST
with a text/plain body needs no preflight) would otherwise be served and billed, the
browser only withholding the answer from the page.

A request whose Origin names this very host (`Host`) is same-origin, not cross-origin: the
demo page served here posts to its own host, and is served without CORS headers.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from ..config import TOKEN_CHARS
from ..errors import Forbidden
from ..policy import CORSPolicy, PolicyHolder
from ..state import EXCHANGE
from .headers import add_response_headers

_VARY = {"Vary": "Origin"}  # a refused origin: no CORS headers, but caches must still vary
# Access-Control-Request-Headers as browsers send it: header names (RFC 9110 tokens), commas,
# spaces; bounded, so an answer never grows with what a client makes up.
_NAME = TOKEN_CHARS + "{1,64}"
_HEADER_LIST = re.compile(rf"{_NAME}(?:[ \t]*,[ \t]*{_NAME}){{0,31}}")


def _same_origin(origin: str, host: str) -> bool:
    """Whether `origin` (scheme://host[:port]) names the host the request was sent to."""
    _, sep, authority = origin.partition("://")
    return bool(sep) and authority.lower() == host.lower()


def _answer(rules: CORSPolicy, request: web.Request, origin: str) -> web.StreamResponse | None:
    """The answer to a request from `origin` (a preflight's, or a refusal); None: serve it."""
    preflight = (
        request.method == hdrs.METH_OPTIONS
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    )
    if preflight:
        answer = rules.for_preflight(origin)
        if answer is None:
            response = Forbidden("CORS origin not allowed", code="cors_origin").response()
            response.headers["Vary"] = "Origin"
            return response
        asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
        if asked and _HEADER_LIST.fullmatch(asked):
            # An allowed origin may send any well-formed header (the OpenAI JS SDK's
            # x-stainless-*, say): what goes upstream is the gateway's allow-list anyway.
            answer = {
                **answer,
                "Access-Control-Allow-Headers": f"{answer['Access-Control-Allow-Headers']}, "
                + asked,
                "Vary": "Origin, Access-Control-Request-Headers",
            }
        return web.Response(status=204, headers=answer)
    allowed = rules.for_actual(origin)
    if allowed is None and not _same_origin(origin, request.host):
        ex = request.get(EXCHANGE)
        if ex is not None:
            ex.outcome = "rejected"
        response = Forbidden("CORS origin not allowed", code="cors_origin").response()
        response.headers["Vary"] = "Origin"
        return response
    add_response_headers(request, allowed or _VARY)
    return None


async def _ready(response: web.StreamResponse) -> web.StreamResponse:
    return response


def make_cors_middleware(policy: PolicyHolder) -> Middleware:
    # Not a coroutine: it answers or passes the request on, so it hands back an awaitable
    # (the handler's own, when it passes) and no frame of its stays in the chain for a
    # stream's life.
    @web.middleware
    def cors(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None:
            answer = _answer(policy.current.cors, request, origin)
            if answer is not None:
                return _ready(answer)
        return handler(request)

    return cors
