"""The shipped nginx site in front of a real gateway: SSE passes event by event, the client's
address reaches the gateway in X-Forwarded-For, SIGTERM drains through nginx, the demo page
and /metrics stay local, and the TLS block serves once filled in."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway.mock_upstream import MockSettings, create_mock_app

from .conftest import UPSTREAM_KEY, GatewayFactory, StartUpstream, chat_body, config_text
from .gateway_process import GatewayProcess
from .nginx_server import NGINX, TLS, Nginx
from .test_service import free_port

pytestmark = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")

StartNginx = Callable[..., Awaitable[Nginx]]
# A client elsewhere: any 127/8 address is local on Linux, but only 127.0.0.1 is nginx's peer
# for the gateway (trusted_proxies) and "local" for the demo page and /metrics.
CLIENT_IP = "127.0.0.5"


def _mock(chunks: int, delay: float = 0.0) -> web.Application:
    return create_mock_app(MockSettings(chunks=chunks, delay=delay, api_key=UPSTREAM_KEY))


@pytest.fixture
async def start_nginx(tmp_path: Path) -> AsyncIterator[StartNginx]:
    started: list[Nginx] = []

    async def go(gateway_port: int, tls: TLS | None = None) -> Nginx:
        tmp = tmp_path / f"nginx{len(started)}"
        tmp.mkdir()
        nginx = Nginx(tmp, gateway_port, free_port(), tls)
        started.append(nginx)
        await nginx.start()
        return nginx

    yield go
    for nginx in started:
        nginx.stop()


def _remote_client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(CLIENT_IP, 0)))


async def test_events_arrive_through_nginx_one_by_one(
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    start_nginx: StartNginx,
    http: aiohttp.ClientSession,
) -> None:
    up = await start_upstream(_mock(chunks=8, delay=0.25))
    gw = await gateway_factory(up.url)
    nginx = await start_nginx(gw.port)
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    async with http.post(f"{nginx.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["X-Request-ID"]
        while True:
            event = await resp.content.readuntil(b"\n\n")
            arrivals.append(loop.time())
            if event == b"data: [DONE]\n\n":
                break
    # The mock spaces its events 0.25 s apart: through a buffering proxy they would arrive
    # in one lump at the end; through this site each arrives on its own.
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    # (Half of them spaced out is plenty: a loaded machine may bunch a few.)
    assert sum(1 for g in gaps if g > 0.1) >= len(gaps) // 2, gaps
    assert arrivals[-1] - arrivals[0] > 1.0


async def test_nginx_passes_the_clients_address_in_x_forwarded_for(
    start_upstream: StartUpstream, start_nginx: StartNginx
) -> None:
    seen: list[dict[str, str]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append({"peer": request.remote or "", **request.headers})
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v1/models", echo)
    backend = await start_upstream(app)
    nginx = await start_nginx(backend.server.port)
    async with _remote_client() as client:
        async with client.get(f"{nginx.url}/v1/models") as resp:
            assert resp.status == 200
        async with client.get(
            f"{nginx.url}/v1/models", headers={"X-Forwarded-For": "203.0.113.9"}
        ) as resp:
            assert resp.status == 200
    # nginx is the gateway's peer (127.0.0.1, a trusted proxy) and sends the address it saw,
    # replacing whatever the client claimed: a client behind another local proxy (its peer
    # 127.0.0.1, trusted too) could otherwise choose the address its per-IP limit counts.
    assert seen[0]["peer"] == "127.0.0.1"
    assert seen[0]["X-Forwarded-For"] == CLIENT_IP
    assert seen[0]["X-Real-IP"] == CLIENT_IP
    assert seen[1]["X-Forwarded-For"] == CLIENT_IP
    # Keep-alive to the gateway: HTTP/1.1 without "Connection: close".
    assert seen[0].get("Connection", "").lower() != "close"


async def test_per_ip_limits_see_the_clients_address_through_nginx(
    gateway_factory: GatewayFactory, upstream_url_mock: str, start_nginx: StartNginx
) -> None:
    # 10 requests a minute per address: 2 at once (burst 1 + 10 // 10).
    gw = await gateway_factory(upstream_url_mock, limits={"per_ip_rpm": 10})
    nginx = await start_nginx(gw.port)
    statuses: dict[str, list[int]] = {}
    with capture_logs() as logs:
        for ip in ("127.0.0.5", "127.0.0.6"):
            connector = aiohttp.TCPConnector(local_addr=(ip, 0))
            async with aiohttp.ClientSession(connector=connector) as client:
                for _ in range(3):
                    # Claiming another address changes nothing: nginx appends the real one.
                    async with client.get(
                        f"{nginx.url}/v1/models", headers={"X-Forwarded-For": "127.0.0.7"}
                    ) as resp:
                        statuses.setdefault(ip, []).append(resp.status)
    # Every request reached the gateway from nginx (127.0.0.1); each address has its own limit.
    assert statuses == {"127.0.0.5": [200, 200, 429], "127.0.0.6": [200, 200, 429]}
    ips = [e["ip"] for e in logs if e["event"] == "access"]
    assert ips == ["127.0.0.5"] * 3 + ["127.0.0.6"] * 3


async def test_demo_page_and_metrics_stay_local(
    gateway_factory: GatewayFactory, upstream_url_mock: str, start_nginx: StartNginx
) -> None:
    gw = await gateway_factory(upstream_url_mock)
    nginx = await start_nginx(gw.port)
    async with _remote_client() as remote, aiohttp.ClientSession() as local:
        for path in ("/", "/metrics"):
            async with remote.get(nginx.url + path) as resp:
                assert resp.status == 403, path  # refused by nginx itself
                assert "X-Request-ID" not in resp.headers
        async with local.get(nginx.url + "/") as resp:
            assert resp.status == 200
            assert "X-Request-ID" in resp.headers  # answered by the gateway
        # Every request through nginx comes from 127.0.0.1, an allowed scraper's address:
        # the gateway refuses the metrics to whatever a proxy relayed (scrape its own port).
        async with local.get(nginx.url + "/metrics") as resp:
            assert resp.status == 403
            assert "X-Request-ID" in resp.headers  # refused by the gateway, not nginx
            assert (await resp.json())["error"]["code"] == "metrics_forbidden"
        async with local.get(f"{gw.url}/metrics") as resp:
            assert resp.status == 200
        async with remote.get(f"{nginx.url}/healthz") as resp:
            assert resp.status == 200


@pytest.fixture
async def upstream_url_mock(start_upstream: StartUpstream) -> str:
    return (await start_upstream(_mock(chunks=2))).url


async def test_sigterm_drains_through_nginx(
    start_upstream: StartUpstream, start_nginx: StartNginx, tmp_path: Path
) -> None:
    # A stream long enough (4 s) to be still running when the probe goes through.
    up = await start_upstream(_mock(chunks=80, delay=0.05))
    path = tmp_path / "config.toml"
    path.write_text(config_text(up.url, server={"shutdown_grace": 20}))
    gw = await GatewayProcess.start(path)
    try:
        nginx = await start_nginx(gw.port)
        async with aiohttp.ClientSession() as probe, aiohttp.ClientSession() as client:
            async with client.post(f"{nginx.url}/v1/chat/completions", json=chat_body()) as s:
                await s.content.readuntil(b"\n\n")
                # After this probe nginx keeps its connection to the gateway idle (keepalive):
                # the next probe goes over a connection that stays open while draining.
                async with probe.get(f"{nginx.url}/readyz") as resp:
                    assert resp.status == 200
                gw.send(signal.SIGTERM)
                await gw.wait_log("draining")
                async with probe.get(f"{nginx.url}/readyz") as resp:
                    assert resp.status == 503
                    assert (await resp.json())["reasons"] == ["draining"]
                body = await s.content.read()
        assert body.endswith(b"data: [DONE]\n\n")
        assert b'"error"' not in body
        assert await gw.wait_exit() == 0
    finally:
        await gw.close()


async def test_a_stream_past_the_grace_ends_with_an_error_event_through_nginx(
    start_upstream: StartUpstream, start_nginx: StartNginx, tmp_path: Path
) -> None:
    up = await start_upstream(_mock(chunks=3000, delay=0.01))
    path = tmp_path / "config.toml"
    path.write_text(config_text(up.url, server={"shutdown_grace": 0.5}))
    gw = await GatewayProcess.start(path)
    try:
        nginx = await start_nginx(gw.port)
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{nginx.url}/v1/chat/completions", json=chat_body()) as s:
                await s.content.readuntil(b"\n\n")
                gw.send(signal.SIGTERM)
                body = await s.content.read()  # a clean chunked end: no ClientPayloadError
        last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "gateway_shutting_down"
        assert body.endswith(b"\n\n")
        assert await gw.wait_exit() == 0
        assert gw.events("grace_expired")
    finally:
        await gw.close()


async def test_the_tls_block_serves_once_filled_in(
    gateway_factory: GatewayFactory,
    upstream_url_mock: str,
    start_nginx: StartNginx,
    tmp_path: Path,
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
    )
    if made.returncode != 0:
        pytest.skip("openssl cannot make a test certificate here")
    gw = await gateway_factory(upstream_url_mock)
    tls = TLS(cert, key, free_port(), redirect_port=free_port())
    await start_nginx(gw.port, tls)
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"https://127.0.0.1:{tls.port}/v1/chat/completions", json=chat_body(), ssl=ctx
        ) as resp:
            assert resp.status == 200
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        # Plain HTTP on the public port: 308 (the client re-sends the POST, body and all, to
        # https), never proxied in the clear.
        async with http.post(
            f"http://127.0.0.1:{tls.redirect_port}/v1/chat/completions?x=1",
            json=chat_body(), headers={"Host": "gateway.example.com"}, allow_redirects=False,
        ) as resp:
            assert resp.status == 308
            assert resp.headers["Location"] == (
                "https://gateway.example.com/v1/chat/completions?x=1"
            )
            assert "X-Request-ID" not in resp.headers
