"""The shipped Prometheus rules and Grafana dashboard (systemd/monitoring/), checked by
promtool and by a real Prometheus scraping a real gateway under a short mixed load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    TEST_KEY,
    TEST_KEY_SHA,
    GatewayFactory,
    Upstream,
    chat_body,
)
from tests.otlp_receiver import OTLPReceiver
from tests.redis_server import redis_limits

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "systemd" / "monitoring"
RULES = MONITORING / "gateway-rules.yml"
RULE_TESTS = MONITORING / "gateway-rules.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
need_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian: prometheus)")

TINY_KEY = "gw-tiny-key-0123456789abcdefghijklmnopqrstuvwxyz"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120
    )


@need_promtool
def test_the_rules_pass_promtool_check() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@need_promtool
def test_the_rules_unit_tests_pass() -> None:
    out = _promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


@need_promtool
def test_the_example_prometheus_config_is_valid() -> None:
    out = _promtool("check", "config", str(MONITORING / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M))
    assert len(alerts) >= 8
    fired = set()
    for block in re.split(r"\n\s*- eval_time:", RULE_TESTS.read_text())[1:]:
        name = re.search(r"alertname: (\w+)", block)
        if name and "exp_labels" in block:
            fired.add(name.group(1))
    assert alerts <= fired, alerts - fired


def test_every_alert_is_explained_in_the_operations_guide() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    for alert in re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M):
        assert f"`{alert}`" in guide, alert


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_the_dashboard_covers_what_operators_look_at() -> None:
    exprs = " ".join(dashboard_exprs())
    for metric in (
        "gateway_requests_total",
        "gateway_ttfb_seconds_bucket",
        "gateway_active_streams",
        "gateway_tokens_total",
        "gateway_throttled_total",
        "gateway_breaker_state",
        "gateway_client_disconnects_total",
        "gateway_retries_total",
    ):
        assert metric in exprs, metric


# ------------------------------------------------------------------ a real Prometheus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http

    async def api(self, path: str, **params: str) -> Any:
        async with self.http.get(f"{self.url}/api/v1/{path}", params=params) as r:
            body = await r.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result


@contextlib.asynccontextmanager
async def prometheus(
    tmp: Path, target: str, http: aiohttp.ClientSession
) -> AsyncIterator[Prometheus]:
    assert PROMETHEUS is not None
    port = _free_port()
    cfg = tmp / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: gateway\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log = open(tmp / "prometheus.log", "wb")  # closed below
    proc = await asyncio.create_subprocess_exec(
        PROMETHEUS,
        f"--config.file={cfg}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}", http)
    try:
        async with asyncio.timeout(60):
            while True:
                assert proc.returncode is None, (tmp / "prometheus.log").read_text()[-3000:]
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{prom.url}/-/ready") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield prom
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(20):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def _load(http: aiohttp.ClientSession, url: str) -> None:
    """A short mix: streams, JSON, 429s from a tiny rpm, a model whose upstream is dead
    (connect errors, a retry, its breaker opening, 502 then 503), a client that leaves."""
    ok = {"Authorization": f"Bearer {TEST_KEY}"}
    tiny = {"Authorization": f"Bearer {TINY_KEY}"}
    post = f"{url}/v1/chat/completions"
    for _ in range(6):
        async with http.post(post, json=chat_body(), headers=ok) as r:
            assert r.status == 200
            await r.read()
        async with http.post(post, json=chat_body(stream=False), headers=ok) as r:
            assert r.status == 200
            await r.read()
        async with http.post(post, json=chat_body(), headers=tiny) as r:
            assert r.status in (200, 429)
            await r.read()
        async with http.post(post, json=chat_body(model="dead-model"), headers=ok) as r:
            assert r.status in (502, 503)
            await r.read()
        # A stream its client leaves after the first event.
        slow = {**ok, "x-mock-chunks": "50", "x-mock-delay": "0.05"}
        async with http.post(post, json=chat_body(), headers=slow) as r:
            await r.content.readline()
        async with http.get(f"{url}/nope") as r:
            await r.read()


_METRIC = re.compile(r"\b(job:[A-Za-z0-9_:]+|gateway_[a-z_]+|up)\b(?!\s*\()")
_COMPARISON = re.compile(r"(?<![=!~])(>|<|==|!=)(?!~)")


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus (Debian: prometheus)")
async def test_a_real_prometheus_evaluates_every_dashboard_and_rule_expression(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    redis_url: str,
    otlp_receiver: OTLPReceiver,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    import hashlib

    dead = f"http://127.0.0.1:{_free_port()}/v1"
    gw = await gateway_factory(
        upstream.url,
        auth={"mode": "keys"},
        keys=[
            {"client": "tester", "sha256": TEST_KEY_SHA},
            {"client": "tiny", "sha256": hashlib.sha256(TINY_KEY.encode()).hexdigest(), "rpm": 1},
        ],
        upstreams=[
            {"models": ["mock-gpt"]},
            {"name": "dead", "base_url": dead, "api_key": "", "models": ["dead-model"]},
        ],
        limits=redis_limits(redis_url),
        breaker={"failure_threshold": 2, "cooldown": 600},
        retry={"attempts": 2, "backoff_initial": 0, "backoff_max": 0},
        tracing={"endpoint": otlp_receiver.url},
    )
    async with prometheus(tmp_path, f"127.0.0.1:{gw.port}", http) as prom:
        # Load, scraped while it runs, then two more scrapes so every rate has two points.
        await _load(http, gw.url)
        async with asyncio.timeout(60):
            while not await prom.query('rate(gateway_requests_total{job="gateway"}[1m]) > 0'):
                await asyncio.sleep(0.5)
        await _load(http, gw.url)
        async with asyncio.timeout(60):
            while not await prom.query("job:gateway_ttfb_seconds:p95_5m"):
                await asyncio.sleep(0.5)
        # Every rule loaded and evaluates without error.
        groups = (await prom.api("rules"))["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == RULES.read_text().count("expr:")
        assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
        exprs = [e.replace("$__rate_interval", "1m").replace("$instance", ".*")
                 for e in dashboard_exprs()]
        empty = []
        for expr in exprs:  # every panel shows data
            if not await prom.query(expr):
                empty.append(expr)
        assert empty == []
        for rule in rules:
            if await prom.query(rule["query"]):
                continue
            # An alert condition that is false in a healthy run: the query is valid (the
            # API said so) and every series it names exists.
            assert rule["type"] == "alerting" and _COMPARISON.search(rule["query"]), rule
            for name in set(_METRIC.findall(rule["query"])):
                assert await prom.query(f'count({{__name__="{name}"}})'), (rule["name"], name)
