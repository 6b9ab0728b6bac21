"""Per-IP throttle, before auth: `[limits].per_ip_rpm` per client address.

It runs before credentials are checked, so a flood of bad keys from one address is refused
cheaply here. The address is the TCP peer, or what a trusted proxy forwarded
(`gateway.clientip`); it is noted on the exchange (`Exchange.ip`) for the access line.

Probes, the metrics scrape and the demo page (`state.UNMETERED` routes) are not counted:
/healthz is liveness, and must answer 200 even while a Redis limiter is unreachable.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from ..clientip import client_ip, limit_key
from ..errors import RateLimited
from ..limits import LIMITER
from ..policy import PolicyHolder
from ..state import EXCHANGE, UNMETERED


def make_ip_throttle_middleware(holder: PolicyHolder) -> Middleware:
    @web.middleware
    async def ip_throttle(request: web.Request, handler: Handler) -> web.StreamResponse:
        policy = holder.current
        ip = client_ip(
            request.remote,
            request.headers.getall(hdrs.X_FORWARDED_FOR, ()),
            policy.trusted_proxies,
        )
        ex = request[EXCHANGE]
        ex.ip = ip
        name = request.match_info.route.name
        if policy.per_ip is not None and not (name and name.startswith(UNMETERED)):
            decision = await request.app[LIMITER].hit(f"ip:{limit_key(ip)}", policy.per_ip)
            if not decision.allowed:
                ex.reason = "ip_rpm"
                raise RateLimited(
                    "Too many requests from this address", retry_after=decision.retry_after
                )
        return await handler(request)

    return ip_throttle
