"""How fast an open breaker answers 503: `python -m tests.bench.breaker`.

Client round trip on a keep-alive connection; the upstream must receive nothing.
"""

import asyncio
import logging
import statistics
import time

import aiohttp
import structlog
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.process.server import start
from tests.conftest import chat_body, make_config
from tests.faulty import Faulty, Step


async def main() -> None:
    faulty = Faulty([Step(500)] * 3)
    server = TestServer(faulty.app(), host="127.0.0.1")
    await server.start_server()
    cfg = make_config(
        f"http://127.0.0.1:{server.port}/v1",
        retry={"attempts": 1},
        breaker={"failure_threshold": 3, "cooldown": 600.0},
    )
    runner, port = await start(create_app(cfg), "127.0.0.1", 0, shutdown_timeout=1)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(url, json=chat_body(stream=False)) as r:
                await r.read()
        times = []
        for _ in range(200):
            t = time.perf_counter()
            async with http.post(url, json=chat_body(stream=False)) as r:
                assert r.status == 503
                await r.read()
            times.append((time.perf_counter() - t) * 1000)
    times.sort()
    print(
        f"open-breaker 503: n=200 median {statistics.median(times):.2f} ms"
        f" p95 {times[189]:.2f} ms max {times[-1]:.2f} ms; upstream requests {faulty.requests}"
    )
    await runner.cleanup()
    await server.close()


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    asyncio.run(main())
