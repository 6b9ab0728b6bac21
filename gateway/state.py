"""The keys shared by every room: the config, the HTTP session, who is calling.

No module-level mutable state: a key names a slot, the app or request holds the value. A key
whose value is one room's own type lives in that room, beside the type (`limits.LIMITER`,
`usage.USAGE`, `streams.log.EVENT_LOG`, `upstream.pool.UPSTREAMS`, `metrics.METRICS`, ...), so
this module imports no room and no room imports another through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aiohttp import ClientSession, web

from .config import Config
from .exchange import Exchange
from .identity import Identity

CONFIG = web.AppKey("config", Config)
HTTP = web.AppKey("http", ClientSession)


class Slot(Protocol):
    """A concurrency slot (`max_concurrent`) held by a request.

    The throttle middleware releases it when the handler returns, unless a handler took
    ownership with `detach()` (a detached generation keeps it until the generation ends).
    """

    def detach(self) -> None: ...

    async def release(self) -> None: ...


# Routes whose name starts with this are served without credentials (health, the demo page,
# reading a detached stream whose unguessable id is its own authorization).
PUBLIC = "public:"
# Routes whose name starts with this take no concurrency slot (`max_concurrent`): they read,
# stop or forget work that already holds one (a background response's own routes), so a
# client at its limit can still follow or cancel what it started.
UNCOUNTED = "uncounted:"
# Public routes that never wait on the limiter either, not even the per-IP throttle: a probe,
# a scrape or the demo page must not turn 503 (or hang) because Redis is down.
UNMETERED = PUBLIC + "unmetered:"

# Request-scoped: the record the access log is written from, and who is calling.
EXCHANGE = web.RequestKey("exchange", Exchange)
IDENTITY = web.RequestKey("identity", Identity)
SLOT = web.RequestKey("slot", Slot)
# The response whose headers have gone (set by the app's on_response_prepare hook): once it
# is there, an error can no longer be a response of its own (`middlewares.errors`).
STARTED = web.RequestKey("started", web.StreamResponse)
# Headers the middlewares want on the response, applied right before it is prepared (so a
# stream prepared inside the handler gets them too): CORS, x-ratelimit-*.
RESPONSE_HEADERS: web.RequestKey[dict[str, str]] = web.RequestKey("response_headers")

# Called once per request when it has ended (from the tracing middleware, possibly inside a
# cancelled handler: a hook must not await), with the exchange and loop.time() at the end.
Finisher = Callable[[web.Request, Exchange, float], None]
FINISHED: web.AppKey[list[Finisher]] = web.AppKey("finished")
