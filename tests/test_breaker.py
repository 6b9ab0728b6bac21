"""The circuit breaker as a state machine: verdicts and `now` in, decisions out, no loop."""

from __future__ import annotations

from gateway.upstream.breaker import Admission, Breaker, State


def opened(threshold: int = 3, cooldown: float = 10.0, at: float = 100.0) -> Breaker:
    b = Breaker(threshold, cooldown)
    for _ in range(threshold):
        b.failure(at)
    return b


def test_closed_breaker_lets_every_request_through() -> None:
    b = Breaker(3, 10.0)
    assert [b.allow(0.0) for _ in range(5)] == [(True, None)] * 5
    assert b.state is State.CLOSED


def test_opens_after_threshold_consecutive_failures() -> None:
    b = Breaker(3, 10.0)
    assert b.failure(1.0) is None
    assert b.failure(2.0) is None
    assert b.failure(3.0) == (State.CLOSED, State.OPEN)
    assert b.state is State.OPEN
    assert b.allow(3.5) == (False, None)


def test_a_success_resets_the_consecutive_count() -> None:
    b = Breaker(3, 10.0)
    b.failure(1.0)
    b.failure(2.0)
    assert b.success() is None
    b.failure(3.0)
    b.failure(4.0)
    assert b.state is State.CLOSED


def test_open_refuses_until_cooldown_then_lets_exactly_one_probe() -> None:
    b = opened(at=100.0)
    assert b.allow(109.9) == (False, None)
    assert b.would_allow(110.0)
    assert b.allow(110.0) == (Admission.PROBE, (State.OPEN, State.HALF_OPEN))
    assert b.allow(110.1) == (False, None)  # the probe is out
    assert not b.would_allow(110.1)


def test_probe_success_closes() -> None:
    b = opened(at=100.0)
    b.allow(111.0)
    assert b.success() == (State.HALF_OPEN, State.CLOSED)
    assert b.allow(111.1) == (True, None)


def test_probe_failure_reopens_for_a_new_cooldown() -> None:
    b = opened(at=100.0)
    b.allow(111.0)
    assert b.failure(112.0) == (State.HALF_OPEN, State.OPEN)
    assert b.allow(121.9) == (False, None)
    assert b.allow(122.0) == (Admission.PROBE, (State.OPEN, State.HALF_OPEN))


def test_abandoned_probe_frees_the_slot_for_the_next_one() -> None:
    b = opened(at=100.0)
    probe, _ = b.allow(111.0)
    b.abandon(probe)  # e.g. the probe's client left, or the upstream answered 429
    assert b.state is State.HALF_OPEN
    assert b.allow(111.5) == (Admission.PROBE, None)


def test_abandon_by_a_request_admitted_while_closed_keeps_the_probe_slot_taken() -> None:
    b = Breaker(failure_threshold=2, cooldown=10.0)
    early, _ = b.allow(0.0)  # admitted while closed; its answer is slow to come
    assert early is Admission.ADMITTED
    b.failure(1.0)
    b.failure(2.0)  # two other requests fail: open
    probe, change = b.allow(12.0)
    assert (probe, change) == (Admission.PROBE, (State.OPEN, State.HALF_OPEN))
    b.abandon(early)  # e.g. its client left, or the upstream answered it 429
    # The probe is still out: nobody else gets through until it has a verdict.
    assert b.allow(12.1) == (Admission.REFUSED, None)
    assert not b.would_allow(12.1)
    b.abandon(probe)
    assert b.allow(12.2) == (Admission.PROBE, None)


def test_late_failure_of_a_request_sent_before_opening_keeps_the_cooldown() -> None:
    b = opened(at=100.0)
    assert b.failure(105.0) is None
    assert b.allow(110.0)[0]


def test_gauge_values_are_ordered_by_severity() -> None:
    assert [int(s) for s in (State.CLOSED, State.HALF_OPEN, State.OPEN)] == [0, 1, 2]
