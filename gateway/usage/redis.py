"""`UsageRecorder` on Redis: per-client totals in one hash each, shared by every instance.

`record` is one MULTI of HINCRBYs (one round trip, all counters or none). The totals never
expire: they are the client's account. If Redis cannot be reached, the record is dropped
and Redis is marked down (the access log line still carries the request's tokens); `totals`
then answers 503 rather than a wrong number.
"""

from __future__ import annotations

import structlog
from redis.exceptions import RedisError

from ..redisconn import CONNECTION_ERRORS, RedisConnection, RedisDown, RedisUnavailable
from .tap import Usage, UsageTotals

log = structlog.get_logger("gateway.redis")

PREFIX = "gw:usage:"
_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


class RedisUsage:
    """`gateway.usage.UsageRecorder` shared through Redis."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    async def record(self, client: str, usage: Usage | None, *, streamed: bool) -> None:
        pipe = self._conn.cmd.pipeline(transaction=True)
        key = PREFIX + client
        pipe.hincrby(key, "requests", 1)
        if streamed:
            pipe.hincrby(key, "streamed", 1)
        if usage is not None:
            pipe.hincrby(key, "prompt_tokens", usage.prompt_tokens)
            pipe.hincrby(key, "completion_tokens", usage.completion_tokens)
            pipe.hincrby(key, "total_tokens", usage.total_tokens)
        try:
            self._conn.check()
            await pipe.execute()
        except (RedisError, OSError) as exc:
            if not isinstance(exc, CONNECTION_ERRORS):
                # Reachable but refusing (OOM, READONLY): not a line per request.
                self._conn.command_failed("usage_record", exc)
                return
            self._conn.failed(exc)
            # One warning when Redis goes; while it is known down, no line per request.
            level = log.debug if isinstance(exc, RedisDown) else log.warning
            level("usage_not_recorded", client=client, error=type(exc).__name__)

    async def totals(self, client: str) -> UsageTotals:
        try:
            self._conn.check()
            values = await self._conn.cmd.hmget(PREFIX + client, list(_FIELDS))
        except (RedisError, OSError) as exc:
            if isinstance(exc, CONNECTION_ERRORS):
                self._conn.failed(exc)
            raise RedisUnavailable("Usage totals are unavailable: Redis is unreachable") from exc
        return UsageTotals(*(int(v) if v is not None else 0 for v in values))
