"""Two gateways sharing limits, usage and detached streams on the Redis deployments people run
(tests/redis_deployments.py starts them): TLS with client certificates and an ACL user, a
Sentinel group whose master is killed mid-run, and a three-master Cluster."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, parse
from gateway.mock_upstream import MockSettings, create_mock_app, reply_pieces
from tests.conftest import (
    TEST_KEY_SHA,
    Gateway,
    GatewayFactory,
    StartUpstream,
    Upstream,
    chat_body,
    config_text,
)
from tests.gates import AUTH, Gates, open_stream, until
from tests.redis_deployments import Cluster, SentinelGroup, TLSRedis, cli
from tests.test_redis_stream_gateways import read_stream, text_of

OTHER_KEY = "gw-other-key-0123456789abcdefghijklmnopqrstuvwxyz"
OTHER_AUTH = {"Authorization": f"Bearer {OTHER_KEY}"}
STREAMER_KEY = "gw-streamer-key-0123456789abcdefghijklmnopqrstuvwxyz"
STREAMER_AUTH = {"Authorization": f"Bearer {STREAMER_KEY}"}


def keys(**tester: Any) -> list[dict[str, Any]]:
    """The test key with `tester` limits, a client "other" (rpm 1, burst 2: a third request
    is refused for a minute, however slow the first two are), and an unlimited "streamer"
    for detached streams."""
    return [
        {"client": "tester", "sha256": TEST_KEY_SHA, "rpm": 0, "max_concurrent": 0, **tester},
        {"client": "other", "sha256": hashlib.sha256(OTHER_KEY.encode()).hexdigest(),
         "rpm": 1, "burst": 2, "max_concurrent": 0},
        {"client": "streamer", "sha256": hashlib.sha256(STREAMER_KEY.encode()).hexdigest(),
         "rpm": 0, "max_concurrent": 0},
    ]  # fmt: skip


async def status(http: aiohttp.ClientSession, gw: Gateway, auth: dict[str, str] = AUTH) -> int:
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(stream=False), headers=auth
    ) as r:
        await r.read()
        return r.status


async def ready(http: aiohttp.ClientSession, gw: Gateway) -> bool:
    async with http.get(f"{gw.url}/readyz") as r:
        await r.read()
        return r.status == 200


async def usage(
    http: aiohttp.ClientSession, gw: Gateway, auth: dict[str, str] = AUTH
) -> dict[str, Any]:
    async with http.get(f"{gw.url}/v1/usage", headers=auth) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def usage_reaches(http: aiohttp.ClientSession, gw: Gateway, n: int) -> None:
    """Usage is recorded as a request finishes, just after its last byte: wait for it."""

    async def reached() -> bool:
        return (await usage(http, gw))["requests"] == n

    await until(reached, timeout=5, every=0.05)


async def pair(factory: GatewayFactory, up: Upstream, limits: dict[str, Any],
               **tester: Any) -> tuple[Gateway, Gateway]:  # fmt: skip
    sections: dict[str, Any] = {"auth": {"mode": "keys"}, "limits": limits}
    return (
        await factory(up.url, keys=keys(**tester), **sections),
        await factory(up.url, keys=keys(**tester), **sections),
    )


async def start_stream(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(f"{url}/v1/streams", json=chat_body(), headers=STREAMER_AUTH) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["url"])


async def shares_rpm(http: aiohttp.ClientSession, a: Gateway, b: Gateway) -> None:
    """Client "other" (burst 2) spends its budget across both instances."""
    assert [await status(http, gw, OTHER_AUTH) for gw in (a, b, a)] == [200, 200, 429]


async def shares_a_resumed_stream(http: aiohttp.ClientSession, a: Gateway, b: Gateway) -> None:
    """A detached stream started on A, read on B, cut, resumed on A with Last-Event-ID."""
    path = await start_stream(http, a.url)
    first = await read_stream(http, b.url, path, stop_after=3)
    rest = await read_stream(http, a.url, path, last=first.events[-1].id)
    events = first.events + rest.events
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert text_of(events) == "".join(reply_pieces("hello there", 10, 1))
    assert events[-1].kind == "done"


@pytest.fixture
async def slow(start_upstream: StartUpstream) -> Upstream:
    """10 chunks 0.05 s apart, and JSON answers for non-stream requests."""
    return await start_upstream(create_mock_app(MockSettings(chunks=10, delay=0.05)))


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("limits", "problem"),
    [
        ({"redis_mode": "sentinel"}, 'limits.sentinels: redis_mode = "sentinel" needs'),
        ({"sentinels": ["127.0.0.1:26379"]}, "limits.sentinels: only used with"),
        ({"redis_mode": "sentinel", "sentinels": ["nohost"]}, "limits.sentinels: 'nohost' is not"),
        ({"redis_mode": "ring"}, "limits.redis_mode: must be one of"),
        ({"redis_url": "rediss://h:1/0", "tls_ca_file": "/nonexistent/ca.pem"},
         "limits.tls_ca_file: '/nonexistent/ca.pem' is not a file"),
        ({"redis_mode": "cluster", "redis_url": "redis://h:1/3"}, "limits.redis_url: a cluster"),
    ],
)
def test_redis_deployment_settings_are_validated_at_load(
    limits: dict[str, Any], problem: str
) -> None:
    text = config_text("http://127.0.0.1:9/v1", limits={"backend": "redis", **limits})
    with pytest.raises(ConfigError) as err:
        parse(text)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_tls_files_need_a_rediss_url_and_go_in_pairs(tmp_path: Any) -> None:
    pem = tmp_path / "c.pem"
    pem.write_text("x")
    limits = {"redis_url": "redis://h:1/0", "tls_cert_file": str(pem)}
    with pytest.raises(ConfigError) as err:
        parse(config_text("http://127.0.0.1:9/v1", limits=limits))
    assert "limits.tls_cert_file: is only used with a rediss:// URL" in err.value.problems
    assert "limits.tls_key_file: tls_cert_file and tls_key_file go together" in err.value.problems


# --------------------------------------------------------------------------------- TLS


async def test_two_gateways_share_limits_usage_and_streams_over_tls_with_a_client_cert(
    gateway_factory: GatewayFactory, slow: Upstream, tls_redis: TLSRedis,
    http: aiohttp.ClientSession,
) -> None:
    limits = {
        "backend": "redis", "per_ip_rpm": 0, "redis_url": tls_redis.url,
        "tls_ca_file": str(tls_redis.ca), "tls_cert_file": str(tls_redis.cert),
        "tls_key_file": str(tls_redis.key),
    }  # fmt: skip
    cli(tls_redis.port, "FLUSHALL", tls=tls_redis.cli_args())
    a, b = await pair(gateway_factory, slow, limits)
    assert await ready(http, a) and await ready(http, b)
    await shares_rpm(http, a, b)
    assert await status(http, a) == 200 and await status(http, b) == 200
    await usage_reaches(http, b, 2)
    await shares_a_resumed_stream(http, a, b)


async def test_a_tls_redis_without_the_client_cert_or_password_is_not_ready(
    gateway_factory: GatewayFactory, upstream: Upstream, tls_redis: TLSRedis,
    http: aiohttp.ClientSession,
) -> None:
    base = {"backend": "redis", "per_ip_rpm": 0, "tls_ca_file": str(tls_redis.ca)}
    no_cert = await gateway_factory(upstream.url, limits={**base, "redis_url": tls_redis.url})
    wrong_pw = tls_redis.url.replace("s3cret-pw", "wrong")
    bad_pw = await gateway_factory(upstream.url, limits={
        **base, "redis_url": wrong_pw, "tls_cert_file": str(tls_redis.cert),
        "tls_key_file": str(tls_redis.key)})  # fmt: skip
    for gw in (no_cert, bad_pw):
        async with http.get(f"{gw.url}/readyz") as r:
            assert r.status == 503
            body = await r.text()
            assert "redis unreachable" in body and "s3cret" not in body and "wrong" not in body


# ------------------------------------------------------------------------------ Cluster


async def test_two_gateways_share_rpm_concurrency_usage_and_a_stream_on_a_cluster(
    gateway_factory: GatewayFactory, slow: Upstream, gates: tuple[Gates, Upstream],
    redis_cluster: Cluster, http: aiohttp.ClientSession,
) -> None:
    redis_cluster.flush()
    limits = {"backend": "redis", "per_ip_rpm": 0, "redis_url": redis_cluster.url,
              "redis_mode": "cluster"}  # fmt: skip
    a, b = await pair(gateway_factory, slow, limits)
    await shares_rpm(http, a, b)
    assert [await status(http, gw) for gw in (a, b, b)] == [200, 200, 200]
    await usage_reaches(http, a, 3)
    for _ in range(3):  # streams land on different slots, so on different nodes
        await shares_a_resumed_stream(http, a, b)
    g, up = gates
    c, d = await pair(gateway_factory, up, limits, max_concurrent=2)
    s1, s2 = await open_stream(http, c.url, "1"), await open_stream(http, d.url, "2")
    assert (s1.status, s2.status) == (200, 200)
    s3 = await open_stream(http, c.url, "3")
    assert s3.status == 429
    s3.close()
    g.gates["1"].set()
    assert (await s1.read()).endswith(b"data: [DONE]\n\n")
    s4 = await open_stream(http, d.url, "4")
    assert s4.status == 200
    for r in (s2, s4):
        r.close()


async def test_a_delete_on_one_cluster_gateway_stops_the_owner_on_the_other(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, redis_cluster: Cluster,
    http: aiohttp.ClientSession,
) -> None:
    """The end is published on a channel: pub/sub reaches every instance on a cluster."""
    redis_cluster.flush()
    up = await start_upstream(create_mock_app(MockSettings(chunks=400, delay=0.05)))
    limits = {"backend": "redis", "per_ip_rpm": 0, "redis_url": redis_cluster.url,
              "redis_mode": "cluster", "lease_ttl": 60}  # fmt: skip
    a, b = await pair(gateway_factory, up, limits)
    path = await start_stream(http, a.url)
    await read_stream(http, b.url, path, stop_after=2)
    started = time.monotonic()
    async with http.delete(b.url + path) as r:
        assert r.status == 204
    rest = await read_stream(http, a.url, path, last=2)
    assert rest.events[-1].kind == "done"
    assert time.monotonic() - started < 5  # not the 60 s lease poll: the message arrived


# ----------------------------------------------------------------------------- Sentinel


async def test_two_gateways_follow_a_sentinel_failover_and_share_again(
    gateway_factory: GatewayFactory, slow: Upstream, sentinel_group: SentinelGroup,
    http: aiohttp.ClientSession,
) -> None:
    grp = sentinel_group
    limits = {
        "backend": "redis", "per_ip_rpm": 0, "lease_ttl": 2.0, "redis_mode": "sentinel",
        "redis_url": "redis://127.0.0.1:1/0",  # not used to connect: the sentinels say where
        "sentinels": grp.sentinel_addrs, "sentinel_master": grp.name,
    }  # fmt: skip
    # "tester": rpm 6 burst 3 (one request per 10 s): spent before the failover.
    a, b = await pair(gateway_factory, slow, limits, rpm=6, burst=3)
    assert [await status(http, gw) for gw in (a, b, a)] == [200, 200, 200]
    assert [await status(http, gw, STREAMER_AUTH) for gw in (a, b, a)] == [200, 200, 200]
    await shares_a_resumed_stream(http, a, b)  # one stream, before
    running = await start_stream(http, a.url)  # a generation running as the master dies
    await read_stream(http, b.url, running, stop_after=1)

    before = await usage(http, a, STREAMER_AUTH)  # 3 requests and 1 stream, at least
    # What the master has and the replica has received, as it dies.
    offsets = [
        int(line.split(":")[1])
        for port, field in ((grp.master.port, "master_repl_offset"),
                            (grp.replica.port, "master_repl_offset"))
        for line in cli(port, "INFO", "replication").splitlines() if line.startswith(field)
    ]  # fmt: skip
    old = grp.master.port
    grp.master.kill()
    killed = time.monotonic()
    await asyncio.to_thread(
        lambda: until_sync(lambda: grp.master_port() == grp.replica.port, 30)
    )
    promoted = time.monotonic() - killed
    for gw in (a, b):
        await until(lambda gw=gw: ready(http, gw), timeout=15, every=0.1)
    recovered = time.monotonic() - killed

    # After the promotion: the budget spent before survives (replicated), and is shared.
    after = [await status(http, gw) for gw in (b, a)]
    totals = await usage(http, b, STREAMER_AUTH)
    await shares_rpm(http, a, b)
    await shares_a_resumed_stream(http, b, a)  # a stream, after
    # The stream running at the failover ends cleanly for its reader (never a hang).
    cut = await read_stream(http, b.url, running, last=1)
    assert cut.status in (200, 204, 404)
    if cut.status == 200:
        assert cut.events[-1].kind in ("done", "fail")
    print(  # the measurement the operations guide quotes (pytest -s shows it)
        f"\nsentinel failover: master {old} -> {grp.replica.port}; replication lag at kill "
        f"{offsets[0] - offsets[1]} bytes; promoted in {promoted:.1f} s; both gateways "
        f"ready {recovered:.1f} s after the kill; usage requests kept "
        f"{totals['requests']}/{before['requests']}; "
        f"rpm state kept: {after == [429, 429]}; stream running at the kill: "
        f"{cut.status} {[e.kind for e in cut.events][-1:]}"
    )
    if offsets[0] == offsets[1]:  # nothing unreplicated: nothing may be lost
        assert totals["requests"] >= before["requests"] >= 3
        assert after == [429, 429]


def until_sync(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "sentinel failover did not happen"
        time.sleep(0.1)
