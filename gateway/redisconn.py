"""The app's Redis connection: pools, health, and what "Redis is down" means.

One `RedisConnection` per app (made in the backend's cleanup context). It holds two pools to
the same server: `cmd` for short commands (tight timeouts, so a lost Redis is noticed in a
second, not a minute) and `block` for the blocking reads of detached streams (whose socket
timeout must outlast `XREAD BLOCK`). Each following reader holds a `block` connection while it
waits, so that pool is bounded (`max_blocking`: the followers cap plus the pub/sub listener);
a caller finding it full waits for a connection rather than opening Redis clients without end.

Health is tracked, not assumed: a monitor task PINGs every `interval` seconds, and at once
when a command fails with a connection error (`failed`). Each transition is logged once
(`redis_unreachable` / `redis_reachable`), never per request; `/readyz` answers 503 while
Redis is down, and `check()` lets callers skip Redis meanwhile (no connect timeout per
request). Nothing here needs a restart: redis-py opens new
connections on the next command, and the monitor notices when they succeed again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from yarl import URL

from .errors import Unavailable

log = structlog.get_logger("gateway.redis")

# What counts as "Redis is unreachable" (as opposed to a bug such as a script error).
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisDown(RedisConnectionError):
    """Raised by `RedisConnection.check` without a round trip while Redis is down."""


class RedisUnavailable(Unavailable):
    """503: a request needed Redis and it could not be reached."""

    default_code = "redis_unavailable"


def redacted(url: str) -> str:
    """The URL without its password, for log lines."""
    u = URL(url)
    return str(u.with_password("***")) if u.password else url


def _client(
    url: str, *, socket_timeout: float | None, max_connections: int | None = None
) -> aioredis.Redis:
    options: dict[str, Any] = dict(
        socket_connect_timeout=1.0,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        # One immediate retry on a fresh connection covers a pooled connection that died
        # with a restarted server; no backoff, so a Redis that is really gone fails fast.
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
    )
    if max_connections is None:
        return aioredis.Redis.from_url(url, **options)
    # Full: wait up to the socket timeout for a connection to come back, then a
    # ConnectionError (which the callers treat as a failed command, not as Redis down).
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=socket_timeout, **options
    )
    return aioredis.Redis.from_pool(pool)


class RedisConnection:
    """The pools, the health flag and its monitor for one app."""

    def __init__(
        self,
        url: str,
        *,
        interval: float = 1.0,
        block_timeout: float = 30.0,
        max_blocking: int = 1000,
    ) -> None:
        self.url = url
        self.interval = interval
        self.cmd = _client(url, socket_timeout=2.0)
        # Blocking reads wait up to `block_timeout`; the socket must wait a little longer.
        self.block = _client(
            url, socket_timeout=block_timeout + 5.0, max_connections=max_blocking
        )
        self.up = False
        self._checked = asyncio.Event()
        self._monitor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

    async def start(self) -> None:
        """Check Redis once (log if it is down) and start the monitor. Never raises:
        a gateway whose Redis is down starts, answers /readyz 503 and waits for it."""
        await self._probe()
        if not self.up:
            log.error(
                "redis_unreachable",
                url=redacted(self.url),
                detail="Redis is down at start: /readyz answers 503 until it is reachable",
            )
        self._monitor = asyncio.get_running_loop().create_task(self._run(), name="redis-monitor")

    async def close(self) -> None:
        # The flag as well as cancel(): on Python 3.11 a cancel that lands as asyncio.timeout
        # expires can be swallowed by it; the loop then still ends at its next turn.
        self._closed = True
        self._wake.set()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.cmd.aclose()
        await self.block.aclose()

    def readiness(self) -> str | None:
        """For `ReadinessChecks`: None when Redis answers, else why not."""
        return None if self.up else "redis unreachable"

    def failed(self, exc: BaseException) -> None:
        """A command failed with a connection error: have the monitor probe at once.

        Only the probe decides that Redis is down: a connection that died with a restarted
        Redis fails once, then the probe's fresh connection finds it back."""
        if not isinstance(exc, RedisDown):  # that one came from check(): no news
            self._wake.set()

    def check(self) -> None:
        """Raise `RedisDown` while the monitor finds Redis down: callers then apply the
        failure policy at once, instead of each paying a connect timeout."""
        if not self.up:
            raise RedisDown("Redis is unreachable")

    def _down(self, exc: BaseException) -> None:
        if self.up:
            self.up = False
            log.error("redis_unreachable", url=redacted(self.url), error=type(exc).__name__)

    def _ok(self) -> None:
        if not self.up:
            self.up = True
            log.info("redis_reachable", url=redacted(self.url))

    async def _probe(self) -> None:
        try:
            await self.cmd.ping()
        except (RedisError, OSError) as exc:  # unreachable, or reachable but unusable (NOAUTH)
            self._down(exc)
        else:
            self._ok()

    async def _run(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            if not self._closed:
                await self._probe()
