"""Rate-limit arithmetic, sans-IO: GCRA on a stored "theoretical arrival time" (TAT).

Nothing here does I/O or reads a clock: callers pass `now` (seconds, any monotonic origin
shared by the store) and the stored TAT, and get back a decision and the TAT to store. The
memory backend calls these functions; the Redis backend runs the same formulas in one Lua
script (with Redis' TIME as `now`) so that both backends agree to the request.

GCRA (the "virtual scheduling" form of the Generic Cell Rate Algorithm,
https://en.wikipedia.org/wiki/Generic_cell_rate_algorithm) for a rate of `limit` events
per `period` seconds allowing `burst` events at once:

    interval  T   = period / limit        seconds one event "costs"
    tolerance tau = burst * T             how far TAT may run ahead of now

    tat'  = max(tat, now) + cost * T
    allow = tat' - now <= tau             else refuse, retry after (tat' - tau - now)

It is smooth (no window edges to burst across), needs one number of state per key, and that
state is worthless once `tat <= now`: an idle key can be forgotten (its TTL is `tat - now`).

Tokens per minute (`tpm`) use the same TAT, but are charged *after* a response (the usage is
only known then) with `charge`, which never refuses; `debt` then refuses new requests while
the TAT runs more than `tau` ahead, i.e. while the client has spent more than its budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rate:
    """`limit` events per `period` seconds, `burst` of them at once (0: default)."""

    limit: int
    period: float = 60.0
    burst: int = 0

    @property
    def interval(self) -> float:
        return self.period / self.limit

    @property
    def capacity(self) -> int:
        """Events allowed at once: `burst`, or by default 1 + limit // 10."""
        return self.burst if self.burst > 0 else 1 + self.limit // 10

    @property
    def tolerance(self) -> float:
        return self.capacity * self.interval


def tokens_per_minute(tpm: int) -> Rate:
    """A tpm budget: a full minute's tokens may be spent at once, refilled smoothly."""
    return Rate(limit=tpm, period=60.0, burst=tpm)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one check, with what the x-ratelimit-* headers report."""

    allowed: bool
    limit: int  # the configured limit (per period)
    remaining: int  # events that would still be admitted right now
    reset_after: float  # seconds until the budget is full again
    retry_after: float  # seconds until an event would be admitted (0 when allowed)


def _remaining(rate: Rate, lead: float) -> int:
    # Events still admitted now: how many intervals fit between the lead and the tolerance.
    return max(0, math.floor((rate.tolerance - lead) / rate.interval + 1e-9))


def gcra(tat: float | None, now: float, rate: Rate, cost: int = 1) -> tuple[Decision, float | None]:
    """Check and count `cost` events. Returns the decision and the TAT to store
    (None: store nothing, the stored TAT is unchanged)."""
    base = now if tat is None or tat < now else tat
    new_tat = base + cost * rate.interval
    lead = new_tat - now
    if lead > rate.tolerance + 1e-9:
        retry = lead - rate.tolerance
        old_lead = base - now
        return Decision(False, rate.limit, _remaining(rate, old_lead), old_lead, retry), None
    return Decision(True, rate.limit, _remaining(rate, lead), lead, 0.0), new_tat


def debt(tat: float | None, now: float, rate: Rate) -> Decision:
    """Whether a budget charged after the fact (tpm) admits a new request now."""
    lead = 0.0 if tat is None or tat < now else tat - now
    remaining = max(0, math.floor((rate.tolerance - lead) / rate.interval))
    if lead >= rate.tolerance:
        return Decision(False, rate.limit, 0, lead, max(lead - rate.tolerance, rate.interval))
    return Decision(True, rate.limit, remaining, lead, 0.0)


def charge(tat: float | None, now: float, rate: Rate, cost: int) -> float:
    """Count `cost` units already spent (never refuses); returns the TAT to store."""
    base = now if tat is None or tat < now else tat
    return base + cost * rate.interval
