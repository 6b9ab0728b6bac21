"""Redis health: down at start is logged once and reported by readiness; the connection
comes back by itself when Redis does."""

from __future__ import annotations

import asyncio

import structlog

from gateway.redisconn import RedisConnection, redacted

from .redis_server import RedisServer, _free_port


async def _until(cond: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_down_at_start_logs_one_line_and_is_not_ready() -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    conn = RedisConnection(url, interval=0.05)
    with structlog.testing.capture_logs() as logs:
        await conn.start()
        await asyncio.sleep(0.3)  # several failed probes
        await conn.close()
    assert conn.readiness() == "redis unreachable"
    lines = [e for e in logs if e["event"] == "redis_unreachable"]
    assert len(lines) == 1
    assert "/readyz" in lines[0]["detail"]


async def test_reconnects_by_itself_after_a_restart(
    redis_server: RedisServer, redis_url: str
) -> None:
    conn = RedisConnection(redis_url, interval=0.05)
    await conn.start()
    try:
        assert conn.readiness() is None
        with structlog.testing.capture_logs() as logs:
            redis_server.stop()
            await _until(lambda: not conn.up)
            redis_server.start()
            await _until(lambda: conn.up)
        assert [e["event"] for e in logs] == ["redis_unreachable", "redis_reachable"]
        assert await conn.cmd.ping()
    finally:
        await conn.close()


def test_passwords_stay_out_of_log_lines() -> None:
    assert redacted("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"


async def test_a_password_given_as_a_query_argument_is_not_logged() -> None:
    # redis-py takes `?password=` as well as the userinfo; the log line names the URL.
    url = f"redis://127.0.0.1:{_free_port()}/0?password=s3cretQueryPw"  # nothing listens
    conn = RedisConnection(url, interval=0.05)
    with structlog.testing.capture_logs() as logs:
        await conn.start()
        await conn.close()
    lines = [e for e in logs if e["event"] == "redis_unreachable"]
    assert lines and all("s3cretQueryPw" not in str(e) for e in lines)
    assert "127.0.0.1" in lines[0]["url"]
