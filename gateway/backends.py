"""The one place that chooses where shared state lives: `[limits].backend`.

`backends` is a cleanup context, the first `create_app` installs, so it opens before and
closes after everything that uses what it installs at `limits.LIMITER`, `usage.USAGE` and
`streams.log.EVENT_LOG`:

- "memory": this process's dicts (`limits.memory`, `usage.memory`, `streams.log`);
- "redis": one Redis shared by every instance (`limits.redis`, `usage.redis`,
  `streams.redis` over `redisconn`): a server, a Sentinel-watched master or a Cluster.
  It also registers the `redis` readiness check (/readyz 503 while Redis is unreachable,
  at start too: the gateway starts and waits for it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from .health import READINESS
from .limits import LIMITER
from .limits.memory import MemoryLimiter
from .limits.redis import RedisLimiter
from .metrics import METRICS
from .redisconn import RedisConnection, RedisTarget
from .state import CONFIG
from .streams.log import EVENT_LOG, MemoryEventLog
from .streams.redis import RedisEventLog
from .usage import USAGE
from .usage.memory import MemoryUsage
from .usage.redis import RedisUsage


async def backends(app: web.Application) -> AsyncIterator[None]:
    if app[CONFIG].limits.backend == "redis":
        async for _ in _redis(app):
            yield
    else:
        async for _ in _memory(app):
            yield


async def _memory(app: web.Application) -> AsyncIterator[None]:
    sse = app[CONFIG].sse
    events = MemoryEventLog(
        max_events=sse.max_log_events,
        max_bytes=sse.max_log_bytes,
        ttl=sse.resume_ttl,
        max_retained_bytes=sse.max_retained_bytes,
    )
    app[LIMITER] = MemoryLimiter()
    app[USAGE] = MemoryUsage()
    app[EVENT_LOG] = events
    try:
        yield
    finally:
        events.close()


async def _redis(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    limits = cfg.limits
    # Each follower holds one blocking connection while it waits; one more for the pub/sub
    # listener of detached streams' ends.
    conn = RedisConnection(
        RedisTarget.from_config(limits),
        block_timeout=limits.lease_ttl,
        max_blocking=cfg.sse.max_followers + 1,
    )
    await conn.start()
    app[READINESS].add("redis", conn.readiness)
    app[METRICS].watch_redis(lambda: conn.up)
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
