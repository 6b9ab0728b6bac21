"""Cost of auth and throttling per request, and limiter memory under a flood of IPs.

Run: python -m tests.bench.limits
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc

from gateway.limits.gcra import Rate, tokens_per_minute
from gateway.limits.memory import MemoryLimiter
from gateway.middlewares.auth import authenticate
from gateway.policy import build_policy
from tests.conftest import TEST_KEY, make_config

N = 100_000


async def main() -> None:
    lim = MemoryLimiter()
    rpm, tpm = Rate(600), tokens_per_minute(100_000)
    t0 = time.perf_counter()
    for _ in range(N):
        await lim.hit("rpm:c", rpm)
        await lim.debt("tpm:c", tpm)
        lease = await lim.slot_acquire("conc:c", 8, 60)
        assert lease is not None
        await lim.slot_release("conc:c", lease)
    per = (time.perf_counter() - t0) / N * 1e6
    print(f"throttle: rpm + tpm check + slot acquire/release: {per:.2f} us/request")

    policy = build_policy(make_config("http://127.0.0.1:1/v1", auth={"mode": "keys"}))
    t0 = time.perf_counter()
    for _ in range(N):
        authenticate(policy, TEST_KEY)
    print(f"auth: sha256 + lookup + compare_digest: {(time.perf_counter() - t0) / N * 1e6:.2f} us")

    tracemalloc.start()
    flood = MemoryLimiter()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(N):
        await flood.hit(f"ip:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", Rate(1200))
    held = (tracemalloc.get_traced_memory()[0] - base) / 1e6
    print(f"memory: {N} distinct IPs within one tolerance window: {held:.1f} MB (swept after ~6 s)")


asyncio.run(main())
