"""`gateway serve` as systemd runs it: a real process, real signals, a notify socket we bind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.mock_upstream import MockSettings, create_mock_app

from .conftest import (
    TEST_KEY,
    TEST_KEY_SHA,
    UPSTREAM_KEY,
    StartUpstream,
    chat_body,
    config_text,
)
from .gateway_process import ROOT, GatewayProcess


def _mock(chunks: int, delay: float = 0.0) -> web.Application:
    return create_mock_app(MockSettings(chunks=chunks, delay=delay, api_key=UPSTREAM_KEY))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NotifySocket:
    """An abstract AF_UNIX datagram socket standing in for systemd's."""

    def __init__(self) -> None:
        self.name = f"@gateway-test-{os.getpid()}-{secrets.token_hex(6)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.setblocking(False)

    async def recv(self, timeout: float = 30.0) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            data = await loop.sock_recv(self.sock, 4096)
        return dict(line.split("=", 1) for line in data.decode().splitlines())


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    ns = NotifySocket()
    yield ns
    ns.sock.close()


Spawn = Callable[..., Any]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """spawn(text, env=..., listening=...) -> GatewayProcess; killed at teardown if left."""
    procs: list[GatewayProcess] = []

    async def go(text: str, *, env: dict[str, str] | None = None, listening: bool = True,
                 name: str = "config.toml") -> GatewayProcess:
        path = tmp_path / name
        path.write_text(text)
        gw = await GatewayProcess.start(path, env, listening=listening)
        procs.append(gw)
        return gw

    yield go
    for gw in procs:
        await gw.close()


async def test_serve_tells_systemd_ready_once_listening_and_stopping_on_sigterm(
    spawn: Spawn, start_upstream: StartUpstream, notify_socket: NotifySocket
) -> None:
    up = await start_upstream(_mock(chunks=2))
    gw = await spawn(config_text(up.url), env={"NOTIFY_SOCKET": notify_socket.name},
                     listening=False)
    ready = await notify_socket.recv()
    assert ready["READY"] == "1"
    port = (await gw.wait_log("listening"))["port"]
    assert ready["STATUS"] == f"listening on 127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:  # READY=1 means the port answers now
        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
    gw.send(signal.SIGTERM)
    assert (await notify_socket.recv())["STOPPING"] == "1"
    assert await gw.wait_exit() == 0
    assert gw.events("stopped")


async def test_sigterm_lets_a_stream_finish_then_exits_0(
    spawn: Spawn, start_upstream: StartUpstream
) -> None:
    up = await start_upstream(_mock(chunks=20, delay=0.05))
    gw = await spawn(config_text(up.url, server={"shutdown_grace": 20}))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
            await resp.content.readuntil(b"\n\n")
            gw.send(signal.SIGTERM)
            body = await resp.content.read()
    assert body.endswith(b"data: [DONE]\n\n")
    assert await gw.wait_exit() == 0


async def test_sighup_reloads_upstreams_without_dropping_a_stream_and_refuses_a_bad_file(
    spawn: Spawn, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    old = await start_upstream(_mock(chunks=40, delay=0.03))
    new = await start_upstream(_mock(chunks=2))
    gw = await spawn(config_text(old.url))
    path = tmp_path / "config.toml"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as running:
            await running.content.readuntil(b"\n\n")
            path.write_text(config_text(new.url))
            gw.send(signal.SIGHUP)
            await gw.wait_log("reloaded")
            async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
            assert new.state.requests["/v1/chat/completions"] == 1

            path.write_text(config_text(old.url).replace("[server]", "[server]\nbogus = 1"))
            gw.send(signal.SIGHUP)
            failed = await gw.wait_log("reload_failed")
            assert failed["problems"] == ["server.bogus: unknown key"]
            async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
            assert new.state.requests["/v1/chat/completions"] == 2  # the good config stayed
            body = await running.content.read()
    assert body.endswith(b"data: [DONE]\n\n")
    assert old.state.requests["/v1/chat/completions"] == 1
    gw.send(signal.SIGTERM)
    assert await gw.wait_exit() == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_workers_share_the_port_are_restarted_and_get_the_signals(
    spawn: Spawn, start_upstream: StartUpstream, notify_socket: NotifySocket
) -> None:
    up = await start_upstream(_mock(chunks=2))
    port = free_port()
    text = config_text(
        up.url,
        server={"port": port, "workers": 2},
        # workers > 1 needs the shared backend; nothing here needs it to answer.
        limits={"backend": "redis", "redis_url": "redis://127.0.0.1:1/0"},
    )
    gw = await spawn(text, env={"NOTIFY_SOCKET": notify_socket.name}, listening=False)
    gw.port = port
    assert (await notify_socket.recv())["READY"] == "1"  # from the supervisor, once both listen
    pids = (await gw.wait_log("workers_ready"))["pids"]
    assert len(pids) == 2 and gw.proc.pid not in pids
    await gw.wait_log("listening", count=2, port=port)  # both workers bound the one port

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(4):
            async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
                assert resp.status == 200

        os.kill(pids[0], signal.SIGKILL)  # a worker dies: it is started again
        await gw.wait_log("worker_exited", pid=pids[0])
        restarted = await gw.wait_log("worker_started", count=3)
        assert restarted["pid"] not in pids
        await gw.wait_log("worker_ready", pid=restarted["pid"])  # the supervisor knows it
        async with http.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200

        gw.send(signal.SIGHUP)  # forwarded: each worker reloads
        await gw.wait_log("reloaded", count=2)
        assert {e["pid"] for e in gw.events("reloaded")} == {pids[1], restarted["pid"]}

    gw.send(signal.SIGTERM)
    assert (await notify_socket.recv())["STOPPING"] == "1"
    assert await gw.wait_exit() == 0
    assert not _alive(pids[1]) and not _alive(restarted["pid"])


async def test_sighup_reloads_keys_limits_and_cors_without_dropping_a_stream(
    spawn: Spawn, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    up = await start_upstream(_mock(chunks=40, delay=0.03))
    new_key = "gw-second-key-0123456789abcdefghijklmnopqrstuvwxyz"
    origin = "https://app.example"

    def text(client: str, key_sha: str, rpm: int, origins: list[str]) -> str:
        return config_text(
            up.url,
            auth={"mode": "keys"},
            cors={"allow_origins": origins},
            keys=[{"client": client, "sha256": key_sha, "rpm": rpm, "burst": 0}],
        )

    gw = await spawn(text("tester", TEST_KEY_SHA, 600, ["http://127.0.0.1:8080"]))
    path = tmp_path / "config.toml"
    old_auth = {"Authorization": f"Bearer {TEST_KEY}"}
    new_auth = {"Authorization": f"Bearer {new_key}"}
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    async with aiohttp.ClientSession() as http:
        async with http.options(f"{gw.url}/v1/chat/completions", headers=preflight) as resp:
            assert resp.status == 403
        async with http.post(
            f"{gw.url}/v1/chat/completions", json=chat_body(), headers=old_auth
        ) as running:
            assert running.status == 200
            await running.content.readuntil(b"\n\n")

            # The client is replaced by another with rpm 6 (burst 1); a new origin allowed.
            new_sha = hashlib.sha256(new_key.encode()).hexdigest()
            path.write_text(text("rotated", new_sha, 6, [origin]))
            gw.send(signal.SIGHUP)
            await gw.wait_log("reloaded")

            async with http.get(f"{gw.url}/v1/models", headers=old_auth) as resp:
                assert resp.status == 401
            async with http.get(f"{gw.url}/v1/models", headers=new_auth) as resp:
                assert resp.status == 200
            async with http.get(f"{gw.url}/v1/models", headers=new_auth) as resp:
                assert resp.status == 429  # the new limit: one at once, then one every 10 s
            async with http.options(f"{gw.url}/v1/chat/completions", headers=preflight) as resp:
                assert resp.status == 204
                assert resp.headers["Access-Control-Allow-Origin"] == origin
            body = await running.content.read()
    # The stream admitted under the old key went on to its end.
    assert body.endswith(b"data: [DONE]\n\n")
    gw.send(signal.SIGTERM)
    assert await gw.wait_exit() == 0


async def test_sighup_during_the_drain_is_ignored_and_streams_finish(
    spawn: Spawn, start_upstream: StartUpstream
) -> None:
    """A `systemctl reload` or a log-rotation HUP while draining must not kill the process."""
    up = await start_upstream(_mock(chunks=30, delay=0.05))
    gw = await spawn(config_text(up.url, server={"shutdown_grace": 20}))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
            await resp.content.readuntil(b"\n\n")
            gw.send(signal.SIGTERM)
            await gw.wait_log("draining")
            gw.send(signal.SIGHUP)
            ignored = await gw.wait_log("reload_ignored")
            assert ignored["reason"] == "draining"
            body = await resp.content.read()
    assert body.endswith(b"data: [DONE]\n\n")
    assert await gw.wait_exit() == 0
    assert not gw.events("reloaded")


async def test_sighup_during_startup_is_applied_once_listening(
    spawn: Spawn, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """A HUP that arrives before the gateway listens is not lost (nor fatal): the file as it
    is then is applied once the gateway serves."""
    old = await start_upstream(_mock(chunks=2))
    new = await start_upstream(_mock(chunks=2))
    gw = await spawn(config_text(old.url), listening=False)
    await gw.wait_log("nofile_limit")  # logged before the event loop starts
    (tmp_path / "config.toml").write_text(config_text(new.url))
    gw.send(signal.SIGHUP)
    gw.port = (await gw.wait_log("listening"))["port"]
    await gw.wait_log("reloaded")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert new.state.requests["/v1/chat/completions"] == 1
    assert old.state.requests["/v1/chat/completions"] == 0
    gw.send(signal.SIGTERM)
    assert await gw.wait_exit() == 0


async def test_sigterm_during_a_workers_restart_backoff_stops_everything_within_the_grace(
    spawn: Spawn, start_upstream: StartUpstream
) -> None:
    up = await start_upstream(_mock(chunks=2))
    port = free_port()
    text = config_text(
        up.url,
        server={"port": port, "workers": 2, "shutdown_grace": 5},
        limits={"backend": "redis", "redis_url": "redis://127.0.0.1:1/0"},
    )
    gw = await spawn(text, listening=False)
    gw.port = port
    pids = (await gw.wait_log("workers_ready"))["pids"]
    os.kill(pids[0], signal.SIGKILL)
    await gw.wait_log("worker_exited", pid=pids[0])  # now in its restart back-off
    gw.send(signal.SIGTERM)
    gw.send(signal.SIGHUP)  # not forwarded once stopping: no worker is killed by it
    assert await gw.wait_exit(timeout=5 + 5) == 0
    assert not _alive(pids[1])
    started = [e["pid"] for e in gw.events("worker_started")]
    assert all(not _alive(pid) for pid in started)
    assert not gw.events("reloaded")


async def test_a_secret_added_by_sighup_is_masked_in_the_logs(
    spawn: Spawn, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    # Literal secrets of no recognisable shape: only the config can tell the redactor.
    old_secret, new_secret = "plainOldUpstreamSecret42", "plainNewUpstreamSecret43"
    up = await start_upstream(_mock(chunks=2))
    env = {"UPSTREAM_SECRET": old_secret}
    text = config_text(up.url, upstreams=[{"api_key": "${UPSTREAM_SECRET}"}])
    gw = await spawn(text, env=env)
    path = tmp_path / "config.toml"
    async with aiohttp.ClientSession() as http:
        # The access line carries the request's path: a place any text can reach the logs.
        async with http.get(f"{gw.url}/nowhere/{old_secret}") as resp:
            assert resp.status == 404
        await gw.wait_log("access", status=404)
        path.write_text(
            text.replace("${UPSTREAM_SECRET}", new_secret)  # a literal, added by the reload
        )
        gw.send(signal.SIGHUP)
        await gw.wait_log("reloaded")
        async with http.get(f"{gw.url}/nowhere/{new_secret}") as resp:
            assert resp.status == 404
        await gw.wait_log("access", status=404, count=2)
    paths = [e["path"] for e in gw.events("access")]
    assert paths == ["/nowhere/[REDACTED]"] * 2
    everything = repr(gw.lines)
    assert old_secret not in everything and new_secret not in everything
    gw.send(signal.SIGTERM)
    assert await gw.wait_exit() == 0


async def test_sigterm_while_the_workers_are_still_starting_exits_0(
    spawn: Spawn, start_upstream: StartUpstream
) -> None:
    # systemd stops the unit while it is still starting (or the supervisor gets TERM as it
    # spawns the workers): the TERM it forwards reaches workers whose interpreter has not
    # installed any handler yet, so they die of the signal. Nothing ran there to be lost;
    # that is a clean stop, not a failed unit.
    up = await start_upstream(_mock(chunks=2))
    port = free_port()
    text = config_text(
        up.url,
        server={"port": port, "workers": 2},
        limits={"backend": "redis", "redis_url": "redis://127.0.0.1:1/0"},
    )
    gw = await spawn(text, listening=False)
    gw.port = port
    await gw.wait_log("worker_started", count=2)
    gw.send(signal.SIGTERM)
    assert await gw.wait_exit() == 0
    started = [e["pid"] for e in gw.events("worker_started")]
    assert all(not _alive(pid) for pid in started)
    assert not gw.events("listening")  # they were stopped before serving (the case here)


async def test_a_redis_password_in_a_refused_url_reaches_no_log_line(
    spawn: Spawn, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    # REDIS_URL from the env file, with a typo in its scheme: the reload is refused and
    # logged, and `gateway check-config` (ExecStartPre, `make reload`) says why; neither
    # may quote the password, in the URL's userinfo or as its `password` query argument.
    password = "plainRedisPassword44"
    bad = [
        f"redis-tls://:{password}@127.0.0.1:6379/0",
        f"rediss+x://127.0.0.1:6379/0?password={password}",
    ]
    up = await start_upstream(_mock(chunks=2))
    gw = await spawn(config_text(up.url), env={"REDIS_URL": bad[0]})
    path = tmp_path / "config.toml"
    path.write_text(
        config_text(up.url, limits={"backend": "redis", "redis_url": "${REDIS_URL}"})
    )
    gw.send(signal.SIGHUP)
    assert "limits.redis_url" in (await gw.wait_log("reload_failed"))["problems"][0]
    gw.send(signal.SIGTERM)
    assert await gw.wait_exit() == 0
    assert gw.lines and all(password not in json.dumps(line) for line in gw.lines)
    for url in bad:
        check = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "check-config", "--config", str(path),
            env={**os.environ, "REDIS_URL": url}, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await check.communicate()
        assert check.returncode != 0
        assert b"limits.redis_url" in out
        assert password.encode() not in out
