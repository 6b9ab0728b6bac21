"""What the Redis backend adds to a request: p50 and p99 latency, memory vs Redis backend.

    python -m tests.bench.redis_latency [--requests N] [--stream]     (or: make bench-redis)

One gateway per backend, in this process, in front of the bundled mock upstream (no delay),
with a key whose limits are on but never reached (per-IP rpm, rpm, tpm, max_concurrent), so
each request pays for every check: per-IP GCRA, client GCRA, tpm debt, slot acquire and
release, tpm charge and the usage record. Requests go one at a time over one keep-alive
connection, so the figures are latency, not throughput. The Redis backend talks to a
redis-server started for the run on a free loopback port (nothing saved).

Prints one line per backend and the difference; the figures move with the machine's load,
so compare the two lines of one run, not runs on different machines.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from gateway import config, logs
from gateway.app import create_app
from gateway.mock_upstream import MockSettings, create_mock_app
from gateway.process.server import start
from tests.conftest import TEST_KEY, TEST_KEY_SHA, UPSTREAM_KEY, make_config
from tests.redis_server import RedisServer


def _config(upstream_url: str, backend: str, redis_url: str) -> config.Config:
    return make_config(
        upstream_url,
        auth={"mode": "keys"},
        limits={"backend": backend, "redis_url": redis_url, "per_ip_rpm": 10_000_000},
        keys=[
            {
                "client": "bench",
                "sha256": TEST_KEY_SHA,
                "rpm": 10_000_000,
                "tpm": 1_000_000_000,
                "max_concurrent": 1000,
            }
        ],
    )


def _percentile(sorted_ms: list[float], p: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * p))]


async def _measure(url: str, n: int, stream: bool) -> list[float]:
    body: dict[str, Any] = {
        "model": "mock-gpt",
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {TEST_KEY}"}
    connector = aiohttp.TCPConnector(limit=1)
    times: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as http:
        for i in range(n + n // 10):  # the first tenth warms up and is not counted
            t0 = time.perf_counter()
            async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"request {i}: HTTP {r.status}: {await r.text()}")
            if i >= n // 10:
                times.append((time.perf_counter() - t0) * 1000)
    return times


# The commands the gateway sends itself (commandstats also counts those its scripts run):
# one round trip each; a MULTI/EXEC pipeline counts once, as its EXEC.
_ROUND_TRIPS = ("cmdstat_evalsha", "cmdstat_zrem", "cmdstat_exec", "cmdstat_hmget")


async def _commands(redis_url: str) -> int:
    r = aioredis.Redis.from_url(redis_url)
    try:
        stats = await r.info("commandstats")
        return sum(int(stats[k]["calls"]) for k in _ROUND_TRIPS if k in stats)
    finally:
        await r.aclose()


async def _run_backend(
    upstream_url: str, backend: str, redis_url: str, n: int, stream: bool
) -> tuple[list[float], float]:
    app = create_app(_config(upstream_url, backend, redis_url))
    runner, port = await start(app, "127.0.0.1", 0, shutdown_timeout=1)
    try:
        before = await _commands(redis_url)
        times = await _measure(f"http://127.0.0.1:{port}", n, stream)
        per_request = (await _commands(redis_url) - before) / (n + n // 10)
    finally:
        await runner.cleanup()
    return times, per_request


async def main(n: int, stream: bool) -> int:
    logs.configure(config.LoggingConfig(level="warning"), stream=sys.stderr)
    mock = TestServer(
        create_mock_app(MockSettings(chunks=5, delay=0.0, api_key=UPSTREAM_KEY)), host="127.0.0.1"
    )
    await mock.start_server()
    upstream_url = f"http://127.0.0.1:{mock.port}/v1"
    with tempfile.TemporaryDirectory(prefix="gw-bench-redis-") as d:
        server = RedisServer(Path(d))
        server.start()
        try:
            results: dict[str, tuple[list[float], float]] = {}
            for backend in ("memory", "redis"):
                results[backend] = await _run_backend(upstream_url, backend, server.url, n, stream)
        finally:
            server.stop()
            await mock.close()
    kind = "streamed" if stream else "non-streamed"
    print(f"{n} sequential {kind} chat completions per backend (mock upstream, no delay)")
    p: dict[str, tuple[float, float]] = {}
    for backend, (times, commands) in results.items():
        times.sort()
        p[backend] = (_percentile(times, 0.50), _percentile(times, 0.99))
        print(
            f"  {backend:6}  p50 {p[backend][0]:6.2f} ms  p99 {p[backend][1]:6.2f} ms  "
            f"mean {statistics.fmean(times):6.2f} ms  redis round trips/request {commands:.1f}"
        )
    print(
        f"  added by redis: p50 {p['redis'][0] - p['memory'][0]:+.2f} ms  "
        f"p99 {p['redis'][1] - p['memory'][1]:+.2f} ms"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--stream", action="store_true", help="stream: true requests")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.requests, args.stream)))
