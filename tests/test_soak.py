"""The soak's CI run: one minute (SOAK_CI_SECONDS) of mixed traffic with 5% upstream faults
against a gateway subprocess, then: every request in the access log with its expected
outcome, no leaked task or upstream connection, RSS growth under 10%.

`make soak` runs the same driver for about ten minutes (SOAK_SECONDS)."""

from __future__ import annotations

import json
import os

import pytest

from .soak.driver import soak

SECONDS = float(os.environ.get("SOAK_CI_SECONDS", "60"))


@pytest.mark.timeout(SECONDS + 180)
async def test_one_minute_soak_loses_nothing_and_leaks_nothing() -> None:
    summary = await soak(SECONDS, concurrency=16, seed=9, warmup=min(15.0, SECONDS / 4))
    report = json.dumps(summary, indent=1)
    assert summary["failures"] == [], report
    assert summary["requests"] > SECONDS * 10, report  # it really was under load
    assert summary["faults_injected"] > 0, report
    assert summary["missing_access"] == 0 and summary["leaks"] == dict.fromkeys(summary["leaks"], 0)
