"""The profile tool's grouping of py-spy samples (`tests.bench.profile`, `make profile`)."""

from __future__ import annotations

import collections

import pytest

from tests.bench.procs import ROOT
from tests.bench.profile import NATIVE, component, components, main, table

LIB = "/venv/lib/python3.11/site-packages"
STD = "/usr/lib/python3.11"
LOOP = f"Runner.run ({STD}/asyncio/runners.py:118)"
MAIN = "thread (1): MainThread"
RAW = [
    f"{MAIN};<module> ({ROOT}/gateway/__main__.py:5);run ({LIB}/uvloop/__init__.py:9);{LOOP} 40",
    f"{MAIN};{LOOP};data_received ({LIB}/aiohttp/web_protocol.py:446) 30",
    f"{MAIN};{LOOP};getone ({LIB}/multidict/_multidict_py.py:1) 5",
    f"{MAIN};{LOOP};UsageTap.process ({ROOT}/gateway/usage/tap.py:160) 20",
    f"{MAIN};tracing ({ROOT}/gateway/middlewares/tracing.py:74);info ({LIB}/structlog/_x.py:1) 4",
    f"{MAIN};Task.__step ({STD}/asyncio/tasks.py:1) 1",
    f"thread (2): Exporter;encode_spans ({LIB}/opentelemetry/exporter/x.py:1) 3",
    f"{MAIN} 2",
    "garbage line",
]


def test_each_sample_goes_to_the_component_of_its_innermost_frame() -> None:
    counts = components(RAW)
    assert counts == collections.Counter(
        {
            "event loop (uvloop)": 40,
            "aiohttp (with multidict, yarl)": 35,
            "gateway: usage/tap": 20,
            "structlog": 4,
            "asyncio (tasks, timeouts)": 1,
            "trace export (opentelemetry, protobuf, urllib3)": 3,
            NATIVE: 2,
        }
    )
    assert component(f"relay ({ROOT}/tests/bench/floor.py:30)") == "bare relay's handler"
    assert component(f"url ({ROOT}/gateway/upstream/pool.py:1)") == "gateway: upstream/pool"
    assert component("f (/elsewhere/gateway/x.py:1)") == "other: x.py"  # not our gateway
    assert component("f (/opt/somewhere/else.py:1)") == "other: else.py"


def test_the_table_scales_samples_to_the_measured_cpu() -> None:
    gateway = collections.Counter({"gateway: relay": 30, "aiohttp (with multidict, yarl)": 70})
    bare = collections.Counter({"aiohttp (with multidict, yarl)": 100})
    text = table("S4", "µs per request", {"gateway": (400.0, gateway), "aiohttp": (150.0, bare)})
    lines = {line.split("  ")[1].strip(): line.split()[-2:] for line in text.splitlines()[2:]}
    assert lines["gateway: relay"] == ["120.0", "0.0"]
    assert lines["aiohttp (with multidict, yarl)"] == ["280.0", "150.0"]
    assert lines["total (measured CPU)"] == ["400.0", "150.0"]
    assert text.splitlines()[-1].split()[-2:] == ["100", "100"]  # the samples behind it
    few = collections.Counter({"gateway: relay": 2, "aiohttp (with multidict, yarl)": 98})
    assert "gateway: relay" not in table("S4", "µs", {"gateway": (400.0, few)})  # noise


@pytest.mark.parametrize("argv", [["--targets", "gatway"], ["--only", "S9"], ["--requests", "10"]])
def test_a_mistyped_target_scenario_or_count_is_refused_before_anything_starts(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err
