"""Liveness and readiness.

/healthz answers 200 while the process runs. /readyz answers 503 while anything registered
in the app's `ReadinessChecks` says no (draining, Redis unreachable), so a load balancer
stops sending new work before the process stops.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from aiohttp import web

READINESS: web.AppKey[ReadinessChecks] = web.AppKey("readiness")

class ReadinessChecks:
    """Named callables returning None when ready, else the reason why not."""

    def __init__(self) -> None:
        self._checks: dict[str, Callable[[], str | None]] = {}

    def add(self, name: str, check: Callable[[], str | None]) -> None:
        self._checks[name] = check

    def reasons(self) -> list[str]:
        return [r for r in (check() for check in self._checks.values()) if r]


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    reasons = request.app[READINESS].reasons()
    if reasons:
        return web.Response(
            status=503,
            body=orjson.dumps({"status": "unavailable", "reasons": reasons}),
            content_type="application/json",
        )
    return web.Response(body=b'{"status":"ready"}', content_type="application/json")
