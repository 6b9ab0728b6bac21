"""Drain: counts requests in flight; while draining, new work is refused with 503.

Public routes (health probes, the demo page, reading a detached stream) are still served,
so a load balancer sees /readyz turn 503 on connections that are still open. Every response
produced while draining closes its connection, so proxies holding keep-alive connections
(nginx's upstream keepalive) move on.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..errors import Unavailable
from ..process.drain import Drain
from ..state import EXCHANGE, PUBLIC


def make_drain_middleware(drain: Drain) -> Middleware:
    draining = Unavailable(
        "the gateway is draining; retry the request",
        code="draining",
        headers={"Retry-After": "1"},
    )

    @web.middleware
    async def drain_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        if drain.draining:
            name = request.match_info.route.name or ""
            if not name.startswith(PUBLIC):
                ex = request.get(EXCHANGE)
                if ex is not None:
                    ex.outcome = "rejected"
                refused = draining.response()
                refused.force_close()
                return refused
        drain.enter()
        try:
            response = await handler(request)
        finally:
            drain.leave()
        if drain.draining and not response.prepared:
            response.force_close()
        return response

    return drain_mw
