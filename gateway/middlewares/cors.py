"""CORS: an exact-origin allow-list with headers precomputed in `gateway.policy.CORSPolicy`.

Sits outside the errors middleware, so a rendered 401/429 still carries the CORS headers a
browser needs to read it (and Retry-After, x-ratelimit-*). A preflight from an allowed origin
is answered 204 here and goes no further (no credentials are sent on a preflight); one from
any other origin is refused 403. A request from a refused origin is served without CORS
headers: the browser then withholds the answer from the page.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from ..errors import Forbidden
from ..policy import PolicyHolder
from .headers import add_response_headers

_VARY = {"Vary": "Origin"}  # a refused origin: no CORS headers, but caches must still vary


def make_cors_middleware(policy: PolicyHolder) -> Middleware:
    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return await handler(request)
        rules = policy.current.cors
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
            return web.Response(status=204, headers=answer)
        add_response_headers(request, rules.for_actual(origin) or _VARY)
        return await handler(request)

    return cors
