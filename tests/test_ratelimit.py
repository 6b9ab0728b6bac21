"""GCRA arithmetic, with no event loop and no clock: `now` is an argument."""

from __future__ import annotations

import pytest

from gateway.limits.gcra import Rate, charge, debt, gcra, tokens_per_minute


def run(rate: Rate, times: list[float]) -> list[bool]:
    tat = None
    out = []
    for now in times:
        d, new = gcra(tat, now, rate)
        if new is not None:
            tat = new
        out.append(d.allowed)
    return out


def test_a_burst_is_admitted_at_once_and_the_next_request_refused() -> None:
    rate = Rate(limit=60, burst=3)
    assert run(rate, [0.0] * 4) == [True, True, True, False]


def test_default_burst_is_one_plus_a_tenth_of_the_rate() -> None:
    assert Rate(limit=600).capacity == 61
    assert Rate(limit=5).capacity == 1


def test_refusal_says_exactly_when_to_retry_and_then_admits() -> None:
    rate = Rate(limit=60, burst=1)  # one request a second
    d, tat = gcra(None, 100.0, rate)
    d2, unchanged = gcra(tat, 100.25, rate)
    assert d.allowed and not d2.allowed and unchanged is None
    assert d2.retry_after == pytest.approx(0.75)
    d3, _ = gcra(tat, 100.25 + d2.retry_after, rate)
    assert d3.allowed


def test_there_is_no_window_edge_to_burst_across() -> None:
    # A fixed one-minute window would admit 2 x 60 requests around its edge; GCRA admits the
    # burst plus what refilled: about one a second.
    rate = Rate(limit=60, burst=1)
    times = [59.0 + i * 0.02 for i in range(100)]  # 100 requests over 2 s across t=60
    assert sum(run(rate, times)) <= 3


def test_a_steady_rate_at_the_limit_is_always_admitted() -> None:
    rate = Rate(limit=600, burst=1)
    assert all(run(rate, [i * 0.1 for i in range(1000)]))


def test_remaining_counts_down_and_reset_is_the_time_to_full() -> None:
    rate = Rate(limit=60, burst=5)
    tat = None
    seen = []
    for _ in range(5):
        d, tat = gcra(tat, 0.0, rate)
        seen.append(d.remaining)
    assert seen == [4, 3, 2, 1, 0]
    assert d.reset_after == pytest.approx(5.0)


def test_refused_requests_do_not_push_the_retry_time_further() -> None:
    rate = Rate(limit=60, burst=1)
    _, tat = gcra(None, 0.0, rate)
    for _ in range(50):
        d, new = gcra(tat, 0.1, rate)
        assert new is None
    assert d.retry_after == pytest.approx(0.9)


def test_tokens_are_charged_after_the_fact_and_refuse_once_over_budget() -> None:
    rate = tokens_per_minute(1000)
    assert debt(None, 0.0, rate).allowed
    tat = charge(None, 0.0, rate, 999)
    assert debt(tat, 0.0, rate).allowed  # 1 token left
    tat = charge(tat, 0.0, rate, 500)  # the response spent more than was left
    d = debt(tat, 0.0, rate)
    assert not d.allowed and d.remaining == 0
    assert d.retry_after == pytest.approx(30.0, abs=0.1)  # 499 tokens over, 1000/min
    assert debt(tat, 30.1, rate).allowed


def test_an_idle_key_is_worth_nothing_once_its_tat_has_passed() -> None:
    rate = Rate(limit=60, burst=2)
    _, tat = gcra(None, 0.0, rate)
    assert tat is not None
    d_fresh, _ = gcra(None, tat, rate)
    d_old, _ = gcra(tat, tat, rate)
    assert d_fresh == d_old
