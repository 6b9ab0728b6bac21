"""A real `redis-server` for the test session: own port, own temp dir, no persistence.

Registered from conftest.py (`pytest_plugins`). `redis_server` is session-scoped (one process
for the whole run; tests that need an empty database use `redis_url`, which flushes it first).
`RedisServer.restart()` stops the process and starts a new one on the same port, which is
what "Redis restarted mid-run" looks like to a gateway holding that URL.

Tests that need Redis are skipped only when redis-server is not installed; CI installs it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _command(port: int, *args: str) -> bytes:
    """Send one command in RESP and return the raw reply (enough for FLUSHALL)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join(parts))
        return s.recv(4096)


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`, data in a temp dir, nothing saved."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start on `self.port` and return once it answers PING."""
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not _ping(self.port):
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                self.proc = None
                raise RuntimeError(f"redis-server exited at start:\n{log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the process (like a crash: no save, clients see their connections drop)."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def flush(self) -> None:
        assert _command(self.port, "FLUSHALL").startswith(b"+OK")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The session's redis-server; skips the test when redis-server is not installed."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="gw-redis-") as d:
        server = RedisServer(Path(d))
        for attempt in range(3):  # the free port may be taken between probe and bind
            try:
                server.start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                server.port = _free_port()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of an empty, running Redis (restarted if a previous test stopped it)."""
    if not redis_server.running:
        redis_server.proc = None
        redis_server.start()
    redis_server.flush()
    return redis_server.url


def redis_limits(url: str, **extra: Any) -> dict[str, Any]:
    """A `[limits]` section for the Redis backend at `url`, per-IP limit off."""
    return {"backend": "redis", "redis_url": url, "per_ip_rpm": 0, **extra}
