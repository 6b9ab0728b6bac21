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
    from .health import ReadinessChecks
    from .metrics import Metrics
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
SLOT = web.RequestKey("slot", Slot)
USAGE = web.AppKey("usage", UsageRecorder)

# Called once per request when it has ended (from the tracing middleware, possibly inside a
# cancelled handler: a hook must not await), with the exchange and loop.time() at the end.
Finisher = Callable[[web.Request, Exchange, float], None]
FINISHED: web.AppKey[list[Finisher]] = web.AppKey("finished")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
