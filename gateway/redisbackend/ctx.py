"""The Redis backend's one lifetime: a cleanup context installed by `create_app` when
`[limits].backend = "redis"`.

It opens the pools, registers the `redis` readiness check (/readyz 503 while Redis is
unreachable, including at start: the gateway still starts and waits for it), and installs
the Redis limiter, usage store and event log at their app keys. It runs before the contexts
that use them, so at shutdown it closes after they have finished (generations ended, usage
records drained).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from ..state import CONFIG, EVENT_LOG, LIMITER, READINESS, USAGE
from .connection import RedisConnection
from .limiter import RedisLimiter
from .streams import RedisEventLog
from .usage import RedisUsage


async def redis_backend(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    limits = cfg.limits
    conn = RedisConnection(limits.redis_url, block_timeout=limits.lease_ttl)
    await conn.start()
    app[READINESS].add("redis", conn.readiness)
    limiter = RedisLimiter(
        conn, fail_open=limits.on_redis_error == "open", lease_ttl=limits.lease_ttl
    )
    events = RedisEventLog(
        conn,
        max_events=cfg.sse.max_log_events,
        max_bytes=cfg.sse.max_log_bytes,
        ttl=cfg.sse.resume_ttl,
        lease_ttl=limits.lease_ttl,
    )
    events.start()
    app[LIMITER] = limiter
    app[USAGE] = RedisUsage(conn)
    app[EVENT_LOG] = events
    try:
        yield
    finally:
        await events.close()
        await limiter.aclose()
        await conn.close()
