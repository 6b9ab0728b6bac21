"""Everything shared lives on the app or the request under these typed keys.

No module-level mutable state: a key names a slot, the app or request holds the value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from aiohttp import ClientSession, web

from .config import Config
from .exchange import Exchange
from .identity import Identity
from .usage import Usage, UsageTotals

if TYPE_CHECKING:
    from .drain import Drain
    from .health import ReadinessChecks
    from .limits import LimiterBackend
    from .metrics import Metrics
    from .policy import PolicyHolder
    from .reload import Reloaders
    from .streams.log import EventLog
    from .streams.registry import StreamTasks
    from .upstream import UpstreamPool

CONFIG = web.AppKey("config", Config)
HTTP = web.AppKey("http", ClientSession)
UPSTREAMS: web.AppKey[UpstreamPool] = web.AppKey("upstreams")



class Slot(Protocol):
    """A concurrency slot (`max_concurrent`) held by a request.

    The throttle middleware releases it when the handler returns, unless a handler took
    ownership with `detach()` (a detached generation keeps it until the generation ends).
    """

    def detach(self) -> None: ...

    async def release(self) -> None: ...


class UsageRecorder(Protocol):
    """Per-client usage totals (memory or Redis).

    `record` is called once per relayed request when it ends (one request, plus its tokens
    when `usage` is not None). It is called from a task the accounting hook owns, never from
    a cancelled handler, so it may await I/O; the app waits for pending records at cleanup.
    """

    async def record(self, client: str, usage: Usage | None, *, streamed: bool) -> None: ...

    async def totals(self, client: str) -> UsageTotals:
        """The client's totals; all zero for a client never recorded."""
        ...


# Routes whose name starts with this are served without credentials (health, the demo page,
# reading a detached stream whose unguessable id is its own authorization).
PUBLIC = "public:"

# Request-scoped: the record the access log is written from, and who is calling.
EXCHANGE = web.RequestKey("exchange", Exchange)
IDENTITY = web.RequestKey("identity", Identity)
READINESS: web.AppKey[ReadinessChecks] = web.AppKey("readiness")
# Shutdown state (draining flag, in-flight upstream responses) and the SIGHUP reload hooks.
DRAIN: web.AppKey[Drain] = web.AppKey("drain")
RELOADERS: web.AppKey[Reloaders] = web.AppKey("reloaders")
SLOT = web.RequestKey("slot", Slot)
# The caller's address (gateway.clientip: TCP peer, or X-Forwarded-For from a trusted proxy).
CLIENT_IP = web.RequestKey("client_ip", str)
# Headers the middlewares want on the response, applied right before it is prepared (so a
# stream prepared inside the handler gets them too): CORS, x-ratelimit-*.
RESPONSE_HEADERS: web.RequestKey[dict[str, str]] = web.RequestKey("response_headers")
# Keys, JWT keys, limits and CORS derived from the config; `.replace(cfg)` on reload.
POLICY: web.AppKey[PolicyHolder] = web.AppKey("policy")
# The limiter backend (memory, or Redis when limits.backend = "redis").
LIMITER: web.AppKey[LimiterBackend] = web.AppKey("limiter")
# Detached streams' event logs (memory, or a shared backend installed before streams' ctx).
EVENT_LOG: web.AppKey[EventLog] = web.AppKey("event_log")
STREAM_TASKS: web.AppKey[StreamTasks] = web.AppKey("stream_tasks")
USAGE = web.AppKey("usage", UsageRecorder)

# Called once per request when it has ended (from the tracing middleware, possibly inside a
# cancelled handler: a hook must not await), with the exchange and loop.time() at the end.
Finisher = Callable[[web.Request, Exchange, float], None]
FINISHED: web.AppKey[list[Finisher]] = web.AppKey("finished")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
