"""A circuit breaker per upstream, sans-IO: verdicts and `now` in, decisions out.

    closed --(failure_threshold consecutive failures)--> open
    open --(cooldown elapsed, next request)--> half_open (exactly one probe let through)
    half_open --(probe succeeds)--> closed
    half_open --(probe fails)--> open (a new cooldown)

Nothing here does I/O or reads a clock: the caller passes `now` (loop.time()) and logs or
counts the transitions the methods return. What counts as a failure (connect errors,
timeouts, 5xx) is the caller's decision; a verdict that is neither (an upstream 429, an
attempt cancelled by its client) is reported with `abandon(admission)` so a half-open probe
slot is never lost. `allow` says which admission it gave (`Admission.PROBE` for the half-open
probe): only the probe's own abandon frees the probe slot, so a request admitted while the
breaker was closed, ending without a verdict after it opened, cannot let a second probe out.
"""

from __future__ import annotations

import enum

__all__ = ["Admission", "Breaker", "State", "Transition"]


class State(enum.IntEnum):
    """The gauge value of each state (`gateway_breaker_state`)."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


Transition = tuple[State, State]  # (old, new)


class Admission(enum.IntEnum):
    """What `allow` gave: falsy when refused."""

    REFUSED = 0
    ADMITTED = 1  # closed: an ordinary request
    PROBE = 2  # half-open: the one probe


class Breaker:
    """One upstream's breaker."""

    __slots__ = ("cooldown", "failures", "opened_at", "probing", "state", "threshold")

    def __init__(self, failure_threshold: int, cooldown: float) -> None:
        self.threshold = failure_threshold
        self.cooldown = cooldown
        self.state = State.CLOSED
        self.failures = 0  # consecutive, while closed
        self.opened_at = 0.0
        self.probing = False  # a half-open probe is in flight

    def allow(self, now: float) -> tuple[Admission, Transition | None]:
        """May a request go to this upstream now? Taking the half-open probe is a transition."""
        if self.state is State.CLOSED:
            return Admission.ADMITTED, None
        if self.state is State.OPEN:
            if now - self.opened_at < self.cooldown:
                return Admission.REFUSED, None
            self.state = State.HALF_OPEN
            self.probing = True
            return Admission.PROBE, (State.OPEN, State.HALF_OPEN)
        # Half-open: the one probe is out, or came back without a verdict (abandoned).
        if self.probing:
            return Admission.REFUSED, None
        self.probing = True
        return Admission.PROBE, None

    def would_allow(self, now: float) -> bool:
        """`allow` without taking anything (for "is any upstream available at all?")."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            return now - self.opened_at >= self.cooldown
        return not self.probing

    def success(self) -> Transition | None:
        self.failures = 0
        self.probing = False
        if self.state is State.CLOSED:
            return None
        old, self.state = self.state, State.CLOSED
        return old, State.CLOSED

    def failure(self, now: float) -> Transition | None:
        self.probing = False
        if self.state is State.CLOSED:
            self.failures += 1
            if self.failures < self.threshold:
                return None
        elif self.state is State.OPEN:
            return None  # a request let through before it opened: the clock already runs
        old, self.state = self.state, State.OPEN
        self.opened_at = now
        self.failures = 0
        return old, State.OPEN

    def abandon(self, admission: Admission) -> None:
        """The attempt `allow` admitted ended with no verdict on the upstream's health: if it
        was the probe, free the probe slot (any other admission holds nothing)."""
        if admission is Admission.PROBE:
            self.probing = False
