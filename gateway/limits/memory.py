"""`LimiterBackend` for one process (`[limits] backend = "memory"`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .gcra import Decision, Rate, charge, debt, gcra


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
