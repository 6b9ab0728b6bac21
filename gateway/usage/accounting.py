"""Usage accounting: every relayed request is recorded per client when it ends.

The tracing middleware's finish hook hands the exchange to `Accounting.finished`, which may
run in a handler being cancelled (the client left mid-stream); so it never awaits there but
starts a task of its own, tracked until it ends and awaited when the app shuts down. The
store is whatever `usage.USAGE` holds: `MemoryUsage` for one process, or the Redis store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import structlog
from aiohttp import web

from ..exchange import Exchange
from ..state import EXCHANGE, IDENTITY
from . import USAGE
from .memory import MemoryUsage

log = structlog.get_logger("gateway.accounting")

__all__ = ["Accounting", "client_of", "usage_handler"]


def client_of(request: web.Request, ex: Exchange | None = None) -> str:
    """Who the request is accounted to: the authenticated client, else "anonymous"."""
    if ex is not None and ex.client:
        return ex.client
    identity = request.get(IDENTITY)
    return identity.client if identity is not None else "anonymous"


class Accounting:
    """The finish hook that records relayed requests, and the tasks it started."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def finished(self, request: web.Request, ex: Exchange, now: float) -> None:
        if ex.upstream is None:
            return  # never reached an upstream (rejected, throttled, not a relayed route)
        recorder = request.app[USAGE]
        client = client_of(request, ex)
        if isinstance(recorder, MemoryUsage):
            recorder.add(client, ex.usage, streamed=ex.stream)
            return
        task = asyncio.get_running_loop().create_task(
            recorder.record(client, ex.usage, streamed=ex.stream)
        )
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("usage_record_failed", error=repr(exc))

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def drain(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: at shutdown, wait for the records still being written."""
        yield
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def usage_handler(request: web.Request) -> web.Response:
    """GET /v1/usage: the caller's totals."""
    client = client_of(request, request.get(EXCHANGE))
    t = await request.app[USAGE].totals(client)
    body = {
        "client": client,
        "requests": t.requests,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "total_tokens": t.total_tokens,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")
