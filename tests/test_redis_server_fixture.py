"""The session's redis-server fixture: it answers, it starts empty, it survives a restart."""

from __future__ import annotations

import redis

from .redis_server import RedisServer


def test_redis_url_is_an_empty_running_server(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.ping()
        assert r.dbsize() == 0
        r.set("k", "v")
    finally:
        r.close()


def test_restart_keeps_the_port_and_loses_the_data(
    redis_server: RedisServer, redis_url: str
) -> None:
    r = redis.Redis.from_url(redis_url)
    try:
        r.set("k", "v")
        port = redis_server.port
        redis_server.restart()
        assert redis_server.port == port
        assert r.get("k") is None  # redis-py reconnects; nothing was persisted
    finally:
        r.close()
