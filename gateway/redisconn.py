"""The app's Redis connection: pools, health, and what "Redis is down" means.

One `RedisConnection` per app (made in the backend's cleanup context), for one of three
deployments (`[limits].redis_mode`): a single server ("standalone", `rediss://` for TLS with
an optional CA file and client certificate), the master a group of Sentinels names
("sentinel": redis-py's `master_for` asks them again whenever a connection fails, so a
failover is followed without a restart), or a "cluster" (`RedisCluster`: each command goes to
the node owning its key's hash slot; the backends' multi-key scripts use `{...}` hash tags).
It holds two clients to that Redis: `cmd` for short commands (tight timeouts, so a lost
Redis is noticed in a second, not a minute) and `block` for the blocking reads of detached
streams (whose socket timeout must outlast `XREAD BLOCK`).
The `block` client's pool is bounded (`max_blocking`: the followers cap plus the pub/sub
listener): each following reader holds one of its connections while it waits.

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
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.sentinel as aiosentinel
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from yarl import URL

from .config import LimitsConfig, redacted_url
from .errors import Unavailable

# What the backends call commands on: one server, the master a Sentinel names, or a Cluster.
Client = aioredis.Redis | aiocluster.RedisCluster

log = structlog.get_logger("gateway.redis")

# A Redis error that is not Redis being down is logged at most this often (each op and kind).
_ERROR_LOG_EVERY = 60.0

# What counts as "Redis is unreachable" (as opposed to a bug such as a script error).
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisDown(RedisConnectionError):
    """Raised by `RedisConnection.check` without a round trip while Redis is down."""


class RedisUnavailable(Unavailable):
    """503: a request needed Redis and it could not be reached."""

    default_code = "redis_unavailable"


def redacted(url: str) -> str:
    """The URL without its password, for log lines."""
    return redacted_url(url)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where the Redis is and how to reach it: `[limits]`'s Redis keys, in one value."""

    url: str
    mode: str = "standalone"  # "standalone" | "sentinel" | "cluster"
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str = "mymaster"
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    @classmethod
    def from_config(cls, limits: LimitsConfig) -> RedisTarget:
        return cls(
            limits.redis_url,
            limits.redis_mode,
            limits.sentinels,
            limits.sentinel_master,
            limits.tls_ca_file,
            limits.tls_cert_file,
            limits.tls_key_file,
        )

    def tls(self) -> dict[str, Any]:
        """redis-py's TLS arguments; only for rediss:// (the scheme turns TLS on)."""
        if URL(self.url).scheme != "rediss":
            return {}
        out: dict[str, Any] = {"ssl_cert_reqs": "required"}
        if self.tls_ca_file:
            out["ssl_ca_certs"] = self.tls_ca_file
        if self.tls_cert_file:
            out["ssl_certfile"] = self.tls_cert_file
            out["ssl_keyfile"] = self.tls_key_file
        return out


def _options(socket_timeout: float | None) -> dict[str, Any]:
    return {
        "socket_connect_timeout": 1.0,
        "socket_timeout": socket_timeout,
        "socket_keepalive": True,
        # One immediate retry on a fresh connection covers a pooled connection that died
        # with a restarted server (or a failed-over master); no backoff, so a Redis that is
        # really gone fails fast.
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 0,
    }


def _client(
    target: RedisTarget, *, socket_timeout: float | None, max_connections: int | None = None
) -> tuple[Client, list[aioredis.Redis]]:
    """The client, and the sentinels' own clients (closed with it). With `max_connections`
    its pool is bounded: one server waits for a free connection (up to the socket timeout),
    Sentinel and Cluster pools refuse past it (a failed command, not Redis down)."""
    opts = _options(socket_timeout) | target.tls()
    if target.mode == "cluster":
        bound = {} if max_connections is None else {"max_connections": max_connections}
        return aiocluster.RedisCluster.from_url(target.url, **opts, **bound), []
    if target.mode == "sentinel":
        url = URL(target.url)
        db = url.path.strip("/")
        master_opts = opts | {
            "username": url.user or None,
            "password": url.password or None,
            "db": int(db) if db.isdigit() else 0,
            "ssl": url.scheme == "rediss",
        }
        # The sentinels get the same TLS as the master (a TLS deployment runs both on TLS)
        # but not its credentials: Sentinel's own auth is a separate setting.
        sentinel_opts = _options(1.0) | target.tls() | {"ssl": url.scheme == "rediss"}
        sentinel = aiosentinel.Sentinel(target.sentinels, sentinel_kwargs=sentinel_opts)
        # master_for's pool asks the sentinels for the master on every new connection and
        # drops its connections when the answer changes: a failover is followed by itself.
        if max_connections is not None:
            master_opts["max_connections"] = max_connections
        master = sentinel.master_for(target.sentinel_master, **master_opts)
        return master, list(sentinel.sentinels)
    if max_connections is None:
        return aioredis.Redis.from_url(target.url, **opts), []
    pool = aioredis.BlockingConnectionPool.from_url(
        target.url, max_connections=max_connections, timeout=socket_timeout, **opts
    )
    return aioredis.Redis.from_pool(pool), []


class RedisConnection:
    """The pools, the health flag and its monitor for one app."""

    def __init__(
        self,
        target: str | RedisTarget,
        *,
        interval: float = 1.0,
        block_timeout: float = 30.0,
        max_blocking: int = 1000,
    ) -> None:
        if isinstance(target, str):
            target = RedisTarget(target)
        self.target = target
        self.url = target.url
        # What the log lines name: the URL, or the Sentinel master it stands for.
        self.where = redacted(target.url)
        if target.mode == "sentinel":
            self.where = f"sentinel master {target.sentinel_master!r} ({self.where})"
        self.cluster = target.mode == "cluster"
        self.interval = interval
        self.cmd, sentinels = _client(target, socket_timeout=2.0)
        # Blocking reads wait up to `block_timeout`; the socket must wait a little longer.
        self.block, more = _client(
            target, socket_timeout=block_timeout + 5.0, max_connections=max_blocking
        )
        self._sentinels = sentinels + more
        self.up = False
        self._checked = asyncio.Event()
        self._monitor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        # Errors that are not Redis being down, by (op, kind): when last logged, how many since.
        self._errors: dict[tuple[str, str], tuple[float, int]] = {}

    async def start(self) -> None:
        """Check Redis once (log if it is down) and start the monitor. Never raises:
        a gateway whose Redis is down starts, answers /readyz 503 and waits for it."""
        await self._probe()
        if not self.up:
            log.error(
                "redis_unreachable",
                url=self.where,
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
        for client in self._sentinels:
            await client.aclose()

    def same_slot(self, keys: list[str]) -> list[list[int]]:
        """Indexes of `keys` in groups one script may touch together: all of them on one
        server, one group per hash slot on a cluster (a script's keys must share a slot)."""
        if not self.cluster:
            return [list(range(len(keys)))]
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key_slot(key.encode()), []).append(i)
        return list(groups.values())

    def readiness(self) -> str | None:
        """For `ReadinessChecks`: None when Redis answers, else why not."""
        return None if self.up else "redis unreachable"

    def failed(self, exc: BaseException) -> None:
        """A command failed with a connection error: have the monitor probe at once.

        Only the probe decides that Redis is down: a connection that died with a restarted
        Redis fails once, then the probe's fresh connection finds it back."""
        if not isinstance(exc, RedisDown):  # that one came from check(): no news
            self._wake.set()

    def command_failed(self, op: str, exc: BaseException) -> None:
        """A command failed, Redis reachable (a connection error goes to `failed`): OOM,
        READONLY, a script error. Every request may meet the same one, so it is logged at
        most once a minute for each operation and kind, with how many were not logged."""
        if isinstance(exc, CONNECTION_ERRORS):
            self.failed(exc)
            return
        key = (op, type(exc).__name__)
        now = time.monotonic()
        last, unlogged = self._errors.get(key, (-_ERROR_LOG_EVERY, 0))
        if now - last < _ERROR_LOG_EVERY:
            self._errors[key] = (last, unlogged + 1)
            return
        if len(self._errors) >= 64:  # bounded: kinds are few, but never a growing dict
            self._errors.clear()
        self._errors[key] = (now, 0)
        log.warning("redis_error", op=op, kind=key[1], error=str(exc), not_logged_since=unlogged)

    def check(self) -> None:
        """Raise `RedisDown` while the monitor finds Redis down: callers then apply the
        failure policy at once, instead of each paying a connect timeout."""
        if not self.up:
            raise RedisDown("Redis is unreachable")

    def _down(self, exc: BaseException) -> None:
        if self.up:
            self.up = False
            log.error("redis_unreachable", url=self.where, error=type(exc).__name__)

    def _ok(self) -> None:
        if not self.up:
            self.up = True
            log.info("redis_reachable", url=self.where)

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
