"""The limiter backend: one interface, one atomic round trip per call.

`LimiterBackend` is what the throttle middlewares talk to. Every method is one check or one
update that a shared store can do atomically in a single round trip (Redis: one Lua script
call, with the store's own clock as `now`). The arithmetic is `gateway.ratelimit`'s.

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

import os
import time
from collections.abc import Callable
from typing import Protocol

from .ratelimit import Decision, Rate, charge, debt, gcra


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


class MemoryLimiter:
    """`LimiterBackend` for one process: dicts, swept of idle state every `sweep_every` s.

    Single-threaded asyncio makes each method atomic (no await inside). Size is bounded by
    the keys active within the longest tolerance, not by every key ever seen.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, sweep_every: float = 10.0
    ) -> None:
        self._clock = clock
        self._sweep_every = sweep_every
        self._next_sweep = clock() + sweep_every
        self._tat: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}  # key -> lease id -> expiry

    def __len__(self) -> int:
        """How many keys hold state (for tests and metrics)."""
        return len(self._tat) + len(self._leases)

    def held(self, key: str) -> int:
        """Leases held under `key` (for tests and metrics)."""
        return len(self._leases.get(key, ()))

    def _now(self) -> float:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_every
        self._tat = {k: t for k, t in self._tat.items() if t > now}
        for key in [k for k, held in self._leases.items() if not self._expire(held, now)]:
            del self._leases[key]

    @staticmethod
    def _expire(held: dict[str, float], now: float) -> dict[str, float]:
        for lease in [lease for lease, exp in held.items() if exp <= now]:
            del held[lease]
        return held

    async def hit(self, key: str, rate: Rate, cost: int = 1) -> Decision:
        now = self._now()
        decision, tat = gcra(self._tat.get(key), now, rate, cost)
        if tat is not None:
            self._tat[key] = tat
        return decision

    async def debt(self, key: str, rate: Rate) -> Decision:
        return debt(self._tat.get(key), self._now(), rate)

    async def charge(self, key: str, rate: Rate, cost: int) -> None:
        if cost > 0:
            now = self._now()
            self._tat[key] = charge(self._tat.get(key), now, rate, cost)

    async def slot_acquire(self, key: str, limit: int, ttl: float) -> str | None:
        now = self._now()
        held = self._leases.setdefault(key, {})
        # Stale leases matter only when they would refuse this one: expire them then. Scanning
        # every held lease on every acquire made N concurrent streams cost O(N^2).
        if len(held) >= limit and len(self._expire(held, now)) >= limit:
            return None
        lease = os.urandom(8).hex()
        held[lease] = now + ttl
        return lease

    async def slot_release(self, key: str, lease: str) -> None:
        held = self._leases.get(key)
        if held is not None:
            held.pop(lease, None)
            if not held:
                del self._leases[key]

    async def aclose(self) -> None:
        self._tat.clear()
        self._leases.clear()
