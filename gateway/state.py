"""Everything shared lives on the app or the request under these typed keys.

No module-level mutable state: a key names a slot, the app or request holds the value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import ClientSession, web

from .config import Config
from .exchange import Exchange
from .identity import Identity

if TYPE_CHECKING:
    from .health import ReadinessChecks
    from .upstream import UpstreamPool

CONFIG = web.AppKey("config", Config)
HTTP = web.AppKey("http", ClientSession)
UPSTREAMS: web.AppKey[UpstreamPool] = web.AppKey("upstreams")

# Request-scoped: the record the access log is written from, and who is calling.
EXCHANGE = web.RequestKey("exchange", Exchange)
IDENTITY = web.RequestKey("identity", Identity)
READINESS: web.AppKey[ReadinessChecks] = web.AppKey("readiness")
