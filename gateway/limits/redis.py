"""`LimiterBackend` on Redis: every instance pointed at one Redis shares the limits.

Each check is one Lua script call, so it is atomic and costs one round trip. Scripts read
Redis' own clock (`TIME`), so instances whose clocks disagree still agree on the limit. The
GCRA scripts return the stored TAT and `now` they used; the `Decision` is then built by the
same sans-IO functions the memory backend calls (`gateway.limits.gcra`), over the same doubles,
so both backends answer a given history identically.

Concurrency slots are leases in a sorted set per key (member: lease id, score: expiry in
ms). A lease lives `lease_ttl` seconds and is renewed by this process while it is held (one
pipelined round trip every `lease_ttl / 3` for all leases), so the slots of an instance that
died come back within `lease_ttl`.

A renewal only extends leases still there (`ZADD XX`): a lease released while the renewal
was in flight stays released. Beside each lease zset, each instance keeps a marker alive
(`gw:lim:i:{<zset>}:<instance>`, set by every acquire and renewal for `3 * lease_ttl`; the
hash tag puts it in the zset's cluster slot); when it is missing, Redis lost its data (a
restart), and that renewal re-adds the leases this instance holds there, so held slots are
counted again.

On a Redis Cluster every script touches keys of one hash slot: the checks one key each, the
renewal one call per slot.

Redis unreachable: with `on_redis_error = "open"` every check admits (fail open: a limiter
outage must not become a gateway outage); with "closed" it raises `RedisUnavailable` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from dataclasses import dataclass

import structlog
from redis.exceptions import RedisError

from ..redisconn import CONNECTION_ERRORS, RedisConnection, RedisUnavailable
from .gcra import Decision, Rate, debt, gcra

log = structlog.get_logger("gateway.redis")

PREFIX = "gw:lim:"

# The stored TAT and Redis' now, as exact decimal doubles ("%.17g" round-trips).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS[1] tat key; ARGV interval, tolerance, cost. Returns {allowed, now, tat_before}.
# Same formula as ratelimit.gcra: tat' = max(tat, now) + cost*T; admit when tat' - now <= tau.
_HIT = (
    _NOW
    + """
local interval, tolerance, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local raw = redis.call('GET', KEYS[1])
local tat = tonumber(raw)
local base = now
if tat ~= nil and tat >= now then base = tat end
local new_tat = base + cost * interval
local lead = new_tat - now
if lead > tolerance + 1e-9 then
  return {0, string.format('%.17g', now), raw or ''}
end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.ceil(lead * 1000) + 1)
return {1, string.format('%.17g', now), raw or ''}
"""
)

# KEYS[1] tat key. Returns {now, tat}.
_PEEK = (
    _NOW
    + """
return {string.format('%.17g', now), redis.call('GET', KEYS[1]) or ''}
"""
)

# KEYS[1] tat key; ARGV interval, cost. Counts units already spent; never refuses.
_CHARGE = (
    _NOW
    + """
local tat = tonumber(redis.call('GET', KEYS[1]))
local base = now
if tat ~= nil and tat >= now then base = tat end
local new_tat = base + tonumber(ARGV[2]) * tonumber(ARGV[1])
local px = math.ceil((new_tat - now) * 1000) + 1
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', px)
return 1
"""
)

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function keep(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"""

# KEYS[1] lease zset, KEYS[2] this instance's marker for it; ARGV limit, ttl_ms, lease,
# marker_ms.
# Expired leases are dropped first.
_ACQUIRE = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
keep(KEYS[1], ttl)
redis.call('SET', KEYS[2], 1, 'PX', ARGV[4])
return 1
"""
)

# KEYS pairs (lease zset, this instance's marker for it); ARGV ttl_ms, marker_ms, then one
# lease id per pair. Extends leases still held in Redis (XX); re-adds a lease only when its
# zset's marker is gone (Redis lost its data).
_RENEW = (
    _NOW_MS
    + """
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  local lease = ARGV[2 + (i + 1) / 2]
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    redis.call('ZADD', KEYS[i], now + ttl, lease)
  else
    redis.call('ZADD', KEYS[i], 'XX', now + ttl, lease)
  end
  keep(KEYS[i], ttl)
  redis.call('SET', KEYS[i + 1], 1, 'PX', ARGV[2])
end
return #KEYS / 2
"""
)


def _f(x: float) -> str:
    return repr(float(x))  # shortest exact decimal: Lua's tonumber reads the same double


def _tat(raw: bytes | str) -> float | None:
    return float(raw) if raw else None


@dataclass(slots=True)
class _Held:
    key: str
    deadline: float  # monotonic: the caller's ttl; not renewed past it


class RedisLimiter:
    """`gateway.limits.LimiterBackend` shared through Redis."""

    def __init__(self, conn: RedisConnection, *, fail_open: bool, lease_ttl: float) -> None:
        self._conn = conn
        self._fail_open = fail_open
        self.lease_ttl = lease_ttl
        r = conn.cmd
        self._hit = r.register_script(_HIT)
        self._peek = r.register_script(_PEEK)
        self._charge = r.register_script(_CHARGE)
        self._acquire = r.register_script(_ACQUIRE)
        self._renew = r.register_script(_RENEW)
        self._held: dict[str, _Held] = {}  # lease id -> where it is held
        # Markers beside the lease zsets: alive while this instance holds leases there.
        self._instance = secrets.token_hex(8)
        self._marker_ms = 3 * max(1, int(lease_ttl * 1000))
        self._renewer: asyncio.Task[None] | None = None

    def _marker(self, zset: str) -> str:
        """This instance's marker beside a lease zset, in the zset's cluster slot: its hash tag
        is what Redis hashes of the zset's name (the name's own `{tag}` when it has one)."""
        return f"{PREFIX}i:{{{hash_tag(zset)}}}:{self._instance}"

    def _error(self, exc: BaseException, what: str) -> None:
        """Apply the failure policy: return (admit) when open, raise 503 when closed."""
        self._conn.command_failed(what, exc)
        if not self._fail_open:
            raise RedisUnavailable("Rate limits are unavailable: Redis is unreachable") from exc

    async def hit(self, key: str, rate: Rate, cost: int = 1) -> Decision:
        try:
            self._conn.check()
            _ok, now, raw = await self._hit(
                keys=[PREFIX + key], args=[_f(rate.interval), _f(rate.tolerance), cost]
            )
        except (RedisError, OSError) as exc:
            self._error(exc, "hit")
            return Decision(True, rate.limit, rate.capacity, 0.0, 0.0)
        return gcra(_tat(raw), float(now), rate, cost)[0]

    async def debt(self, key: str, rate: Rate) -> Decision:
        try:
            self._conn.check()
            now, raw = await self._peek(keys=[PREFIX + key])
        except (RedisError, OSError) as exc:
            self._error(exc, "debt")
            return Decision(True, rate.limit, rate.capacity, 0.0, 0.0)
        return debt(_tat(raw), float(now), rate)

    async def charge(self, key: str, rate: Rate, cost: int) -> None:
        if cost <= 0:
            return
        try:
            self._conn.check()
            await self._charge(keys=[PREFIX + key], args=[_f(rate.interval), cost])
        except (RedisError, OSError) as exc:
            with contextlib.suppress(RedisUnavailable):  # after the fact: nothing to refuse
                self._error(exc, "charge")

    async def slot_acquire(self, key: str, limit: int, ttl: float) -> str | None:
        lease = secrets.token_hex(16)
        ttl_ms = max(1, int(min(ttl, self.lease_ttl) * 1000))
        try:
            self._conn.check()
            got = await self._acquire(
                keys=[slots_key(key), self._marker(slots_key(key))],
                args=[limit, ttl_ms, lease, self._marker_ms],
            )
        except (RedisError, OSError) as exc:
            self._error(exc, "slot_acquire")
            return lease  # fail open: an unrecorded lease, released as a no-op
        if not got:
            return None
        self._held[lease] = _Held(slots_key(key), time.monotonic() + ttl)
        self._ensure_renewer()
        return lease

    async def slot_release(self, key: str, lease: str) -> None:
        self._held.pop(lease, None)
        try:
            self._conn.check()
            await self._conn.cmd.zrem(slots_key(key), lease)
        except (RedisError, OSError) as exc:
            # The lease expires by itself within lease_ttl; nothing to refuse.
            if isinstance(exc, CONNECTION_ERRORS):
                self._conn.failed(exc)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_loop(), name="redis-lease-renewer"
            )

    async def _renew_loop(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_ttl / 3)
            await self.renew()

    async def renew(self) -> None:
        """Extend every lease this process holds (one round trip)."""
        now = time.monotonic()
        for lease in [lease for lease, h in self._held.items() if h.deadline <= now]:
            del self._held[lease]  # the caller's ttl ran out: let it expire
        if not self._held:
            return
        leases = list(self._held.items())
        ttl_ms = int(self.lease_ttl * 1000)
        keys = [h.key for _, h in leases]
        calls = [
            self._renew(
                keys=[k for i in g for k in (keys[i], self._marker(keys[i]))],
                args=[ttl_ms, self._marker_ms, *(leases[i][0] for i in g)],
            )
            for g in self._conn.same_slot(keys)
        ]
        for exc in await asyncio.gather(*calls, return_exceptions=True):
            if not isinstance(exc, BaseException):
                continue
            if not isinstance(exc, RedisError | OSError):
                raise exc
            self._conn.command_failed("renew", exc)

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        held, self._held = self._held, {}
        if held:
            # Give the slots back now rather than after lease_ttl (a clean stop).
            with contextlib.suppress(RedisError, OSError):
                pipe = self._conn.cmd.pipeline(transaction=False)
                for lease, h in held.items():
                    pipe.zrem(h.key, lease)
                await pipe.execute()


def hash_tag(key: str) -> str:
    """The part of `key` Redis Cluster hashes: the text between the first `{` and the first
    `}` after it when that is not empty, else the whole key."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def slots_key(key: str) -> str:
    """The lease zset of a concurrency key. Its name has no brace, so its instance markers
    (`{name}` as their hash tag) land in its cluster slot; a key with a brace (a client or
    JWT subject may hold one) is named by its digest instead."""
    if "{" in key or "}" in key:
        return f"{PREFIX}h:{hashlib.sha256(key.encode()).hexdigest()[:32]}"
    return PREFIX + key
