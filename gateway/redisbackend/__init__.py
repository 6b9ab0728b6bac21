"""The Redis backend (`[limits].backend = "redis"`): limits, usage totals and detached
streams shared by every gateway instance pointed at one Redis.

- `connection`: the pools, health tracking and the failure policy's building blocks;
- `limiter`: `LimiterBackend` (GCRA in Lua, concurrency leases);
- `usage`: `UsageRecorder` (totals in hashes);
- `streams`: `EventLog` (Redis Streams, owner leases, cancellation by pub/sub).
"""

from .connection import RedisConnection, RedisUnavailable
from .limiter import RedisLimiter
from .streams import RedisEventLog
from .usage import RedisUsage

__all__ = ["RedisConnection", "RedisEventLog", "RedisLimiter", "RedisUnavailable", "RedisUsage"]
