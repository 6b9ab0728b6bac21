"""The limiter backend: one interface, one atomic round trip per call.

`LimiterBackend` is what the throttle middlewares talk to. Every method is one check or one
update that a shared store can do atomically in a single round trip (Redis: one Lua script
call, with the store's own clock as `now`). The arithmetic is `gcra`'s (sans-IO);
`memory` and `redis` implement the interface.

Keys are opaque strings chosen by the caller ("ip:203.0.113.9", "rpm:alice", "tpm:alice",
"conc:alice"); a backend may prefix them. State for a key that has gone idle is worthless and
must expire on its own, so that a flood of distinct IPs or clients cannot grow it without
bound (Redis: PEXPIRE to the TAT / lease expiry; memory: `MemoryLimiter` sweeps).

Concurrency slots are leases: `slot_acquire` returns a lease id, or None when `limit` leases
are held; `slot_release` gives it back (releasing twice or an unknown lease is a no-op). A
lease also expires after `ttl` seconds, so a process that died holding it does not leak a
slot forever in a shared store; callers pass a `ttl` longer than any holder can live.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from .gcra import Decision, Rate


class LimiterBackend(Protocol):
    async def hit(self, key: str, rate: Rate, cost: int = 1) -> Decision:
        """GCRA check-and-update: count `cost` events if admitted (rpm, per-IP rpm)."""
        ...

    async def debt(self, key: str, rate: Rate) -> Decision:
        """Check, without counting, whether a budget charged after the fact admits now (tpm)."""
        ...

    async def charge(self, key: str, rate: Rate, cost: int) -> None:
        """Count `cost` units already spent (tpm after a response); never refuses."""
        ...

    async def slot_acquire(self, key: str, limit: int, ttl: float) -> str | None:
        """Take one of `limit` concurrency slots: a lease id, or None when all are held."""
        ...

    async def slot_release(self, key: str, lease: str) -> None:
        """Give a lease back. Idempotent: an unknown or expired lease is ignored."""
        ...

    async def aclose(self) -> None:
        """Release the backend's resources (connections)."""
        ...


# The limiter backend in use (memory, or Redis when limits.backend = "redis").
LIMITER: web.AppKey[LimiterBackend] = web.AppKey("limiter")
