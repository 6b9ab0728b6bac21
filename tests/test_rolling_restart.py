"""The proof that a rolling restart drops nothing: the shipped several-instances nginx site in
front of three gateway processes (`gateway serve --port P`, as `gateway@P.service` runs them)
on one Redis, under steady mixed load, each instance restarted in turn (SIGTERM, drained,
started again, ready again before the next), as `make rolling-restart` does.

Load, all through nginx: relayed streams, JSON requests, detached streams followed by readers
that reconnect with Last-Event-ID whenever they are cut; and one client with a small rpm
budget spending it across the restart. Checked: zero failed requests, zero truncated
streams, every detached stream's text complete with no gap or duplicate, the budget shared.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.mock_upstream import MockSettings, create_mock_app, reply_pieces
from gateway.sse import EventSplitter, iter_events, parse_event
from tests.conftest import TEST_KEY_SHA, StartUpstream, chat_body, config_text
from tests.gates import AUTH
from tests.gateway_process import GatewayProcess
from tests.nginx_server import NGINX, Nginx

pytestmark = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")

CHUNKS = 15
TEXT = "".join(reply_pieces("hello there", CHUNKS, 1))
METERED_KEY = "gw-metered-key-0123456789abcdefghijklmnopqrstuvwxyz"
METERED = {"Authorization": f"Bearer {METERED_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failures.append(what)
        if len(self.failures) > 50:
            raise AssertionError(f"more than 50 failures, e.g. {self.failures[:3]}")


async def relayed_streams(http: aiohttp.ClientSession, url: str, t: Tally,
                          stop: asyncio.Event) -> None:  # fmt: skip
    while not stop.is_set():
        async with http.post(f"{url}/v1/chat/completions", json=chat_body(), headers=AUTH) as r:
            body = await r.read()
        t.counts["relayed"] += 1
        text = "".join(
            (orjson.loads(e[6:])["choices"] or [{}])[0].get("delta", {}).get("content", "")
            for e in body.split(b"\n\n") if e.startswith(b"data: {")
        )  # fmt: skip
        if r.status != 200 or not body.endswith(b"data: [DONE]\n\n") or text != TEXT:
            t.fail(f"relayed stream {r.status}: {body[-200:]!r}")


async def json_requests(http: aiohttp.ClientSession, url: str, t: Tally,
                        stop: asyncio.Event) -> None:  # fmt: skip
    while not stop.is_set():
        body = chat_body(stream=False)
        async with http.post(f"{url}/v1/chat/completions", json=body, headers=AUTH) as r:
            answer = await r.read()
        t.counts["json"] += 1
        if r.status != 200 or b'"choices"' not in answer:
            t.fail(f"json {r.status}: {answer[:200]!r}")
        await asyncio.sleep(0.02)  # pacing: a bounded number of requests


async def follow(http: aiohttp.ClientSession, url: str, path: str, t: Tally) -> None:
    """Read a detached stream to its end like EventSource: reconnect with Last-Event-ID
    whenever the connection is cut; check the events have no gap and no duplicate."""
    ids: list[int] = []
    text = ""
    last_kind = ""
    for _ in range(50):  # bounded: each round reads at least one event or ends
        headers = {"Last-Event-ID": str(ids[-1])} if ids else {}
        try:
            async with http.get(url + path, headers=headers) as r:
                if r.status == 204:
                    break
                if r.status != 200:
                    t.fail(f"detached GET {r.status}: {(await r.read())[:200]!r}")
                    return
                splitter = EventSplitter()
                async for chunk in r.content.iter_any():
                    for raw in iter_events(splitter.feed(chunk)):
                        ev = parse_event(raw)
                        if ev is None or ev.data is None or ev.id is None:
                            continue
                        ids.append(int(ev.id))
                        last_kind = ev.event or ""
                        if ev.event == "delta":
                            text += orjson.loads(ev.data).get("content", "")
        except (TimeoutError, aiohttp.ClientError):
            t.counts["reader_cut"] += 1
            continue
        if last_kind in ("done", "fail"):
            break
        t.counts["reader_cut"] += 1
    if ids != list(range(1, len(ids) + 1)) or text != TEXT or last_kind != "done":
        t.fail(f"detached stream {path}: ids {ids}, last {last_kind!r}, text {text!r}")


async def detached_streams(http: aiohttp.ClientSession, url: str, t: Tally,
                           stop: asyncio.Event) -> None:  # fmt: skip
    while not stop.is_set():
        async with http.post(f"{url}/v1/streams", json=chat_body(), headers=AUTH) as r:
            answer = await r.read()
        if r.status != 201:
            t.fail(f"detached POST {r.status}: {answer[:200]!r}")
            continue
        t.counts["detached"] += 1
        await follow(http, url, orjson.loads(answer)["url"], t)


async def metered(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(
        f"{url}/v1/chat/completions", json=chat_body(stream=False), headers=METERED
    ) as r:
        await r.read()
        return r.status


async def ready(http: aiohttp.ClientSession, port: int) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)  # polling: nothing announces readiness to a client


async def test_a_rolling_restart_behind_nginx_drops_nothing(
    start_upstream: StartUpstream, redis_url: str, tmp_path: Path
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=CHUNKS, delay=0.05)))
    keys = [
        {"client": "tester", "sha256": TEST_KEY_SHA, "rpm": 0, "max_concurrent": 0},
        # One request a minute, three at once: spent before the restart, never refilled.
        {"client": "metered", "sha256": hashlib.sha256(METERED_KEY.encode()).hexdigest(),
         "rpm": 1, "burst": 3, "max_concurrent": 0},
    ]  # fmt: skip
    config = tmp_path / "config.toml"
    config.write_text(config_text(
        up.url, keys=keys, server={"shutdown_grace": 10}, auth={"mode": "keys"},
        limits={"backend": "redis", "redis_url": redis_url, "per_ip_rpm": 0},
    ))  # fmt: skip
    ports = [free_port() for _ in range(3)]

    async def start(port: int) -> GatewayProcess:
        return await GatewayProcess.start(config, args=["--port", str(port)])

    gws = [await start(p) for p in ports]
    (tmp_path / "nginx").mkdir()
    listen = free_port()
    nginx = Nginx(tmp_path / "nginx", 0, listen, instance_ports=ports)
    t = Tally()
    try:
        assert [g.port for g in gws] == ports
        await nginx.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            budget = [await metered(http, nginx.url) for _ in range(4)]
            assert budget == [200, 200, 200, 429]
            stop = asyncio.Event()
            load = [
                *(relayed_streams(http, nginx.url, t, stop) for _ in range(3)),
                *(json_requests(http, nginx.url, t, stop) for _ in range(2)),
                *(detached_streams(http, nginx.url, t, stop) for _ in range(3)),
            ]
            tasks = [asyncio.create_task(c) for c in load]
            await asyncio.sleep(0.5)  # load running on all three before the first restart
            for i, port in enumerate(ports):
                gws[i].send(signal.SIGTERM)
                assert await gws[i].wait_exit() == 0
                gws[i] = await start(port)
                await ready(http, port)
                budget.append(await metered(http, nginx.url))  # refused on every instance
                t.counts["restarted"] += 1
            await asyncio.sleep(0.5)
            stop.set()
            async with asyncio.timeout(60):
                await asyncio.gather(*tasks)
            budget.append(await metered(http, nginx.url))
        print(f"\nrolling restart through nginx: {dict(t.counts)}, failures {len(t.failures)}")
        assert t.failures == []
        assert t.counts["restarted"] == 3
        assert min(t.counts["relayed"], t.counts["json"], t.counts["detached"]) > 3
        # Three admitted in all: the budget lived in Redis, not in the restarted processes.
        assert budget == [200, 200, 200, 429, 429, 429, 429, 429]
    finally:
        nginx.stop()
        for g in gws:
            await g.close()


@pytest.mark.parametrize("headers_sent", [False, True])
async def test_a_json_request_cut_by_the_grace_is_not_generated_again_elsewhere(
    start_upstream: StartUpstream, tmp_path: Path, headers_sent: bool
) -> None:
    # A non-stream request still waiting on its upstream when the shutdown grace runs out:
    # its generation already ran (and was paid for) upstream, so whatever the draining
    # instance answers, nginx must not replay the POST on the next instance. (The upstream
    # answers non-stream requests only once the completion is done: headers pending is
    # the common case.)
    arrived = [asyncio.Event(), asyncio.Event()]
    hold = asyncio.Event()

    def upstream(i: int) -> web.Application:
        async def chat(request: web.Request) -> web.StreamResponse:
            await request.read()
            arrived[i].set()
            if not headers_sent:
                await hold.wait()
            resp = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Content-Length": "100"})
            await resp.prepare(request)
            await resp.write(b'{"id": ')
            await hold.wait()
            return resp

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app

    ups = [await start_upstream(upstream(i)) for i in range(2)]
    ports = [free_port() for _ in range(2)]
    gws: list[GatewayProcess] = []
    (tmp_path / "nginx").mkdir()
    nginx = Nginx(tmp_path / "nginx", 0, free_port(), instance_ports=ports)
    try:
        for i, port in enumerate(ports):
            config = tmp_path / f"config{i}.toml"
            config.write_text(config_text(ups[i].url, server={"shutdown_grace": 1}))
            gws.append(await GatewayProcess.start(config, args=["--port", str(port)]))
        await nginx.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

            async def call() -> int:
                async with http.post(f"{nginx.url}/v1/chat/completions",
                                     json=chat_body(stream=False)) as resp:
                    await resp.read()
                    return resp.status

            client = asyncio.create_task(call())
            firsts = [asyncio.create_task(e.wait()) for e in arrived]
            done, _ = await asyncio.wait(firsts, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            assert done, "the request reached no upstream"
            first = 0 if arrived[0].is_set() else 1
            gws[first].send(signal.SIGTERM)
            replayed = firsts[1 - first]
            await asyncio.wait([client, replayed], timeout=40,
                               return_when=asyncio.FIRST_COMPLETED)
            assert not arrived[1 - first].is_set(), "nginx generated it again on the other"
            assert client.done()
            assert client.result() >= 500
            assert await gws[first].wait_exit() == 0
            for f in firsts:
                f.cancel()
    finally:
        hold.set()
        nginx.stop()
        for g in gws:
            await g.close()
