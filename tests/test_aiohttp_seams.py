"""Every use of aiohttp beyond its documented API (gateway/aiohttp_seams.py), checked against
the installed aiohttp over real sockets: an upgrade that changes one fails here, by name."""

from __future__ import annotations

import asyncio
import re
import warnings
from pathlib import Path

import aiohttp
import aiohttp.connector
import pytest
from aiohttp import web

import gateway
from gateway import aiohttp_seams
from gateway.app import create_app
from gateway.process.server import start

from .conftest import StartUpstream, make_config


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_bytes_sent_counts_what_the_transport_was_handed() -> None:
    seen: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        before = aiohttp_seams.bytes_sent(request)
        await resp.write(b"x" * 1000)
        seen.append(aiohttp_seams.bytes_sent(request) - before)
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    runner, url = await _serve(app)
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            await resp.read()
    finally:
        await runner.cleanup()
    assert seen[0] >= 1000


async def test_on_connection_release_fires_once_when_the_response_ends(
    start_upstream: StartUpstream,
) -> None:
    finish = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"chunk\n")
        await finish.wait()
        await resp.write(b"last\n")
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    up = await start_upstream(app)
    released: list[str] = []
    async with aiohttp.ClientSession() as http:
        resp = await http.get(up.url.removesuffix("/v1") + "/")
        assert aiohttp_seams.on_connection_release(resp, lambda: released.append("read"))
        assert released == []
        finish.set()
        await resp.read()  # read to the end: the connection goes back to the pool
        assert released == ["read"]
        resp.release()
        assert released == ["read"]

        finish.clear()
        resp = await http.get(up.url.removesuffix("/v1") + "/")
        assert aiohttp_seams.on_connection_release(resp, lambda: released.append("closed"))
        resp.close()  # abandoned mid-body
        assert released == ["read", "closed"]
        assert not aiohttp_seams.on_connection_release(resp, lambda: None)
        finish.set()


async def test_fail_body_makes_the_pending_read_raise(start_upstream: StartUpstream) -> None:
    never = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first\n")
        await never.wait()
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    up = await start_upstream(app)

    class Boom(Exception):
        pass

    async with aiohttp.ClientSession() as http, http.get(up.url.removesuffix("/v1") + "/") as resp:
        assert await resp.content.readline() == b"first\n"
        pending = asyncio.ensure_future(resp.content.readany())
        await asyncio.sleep(0)  # the read is waiting for data
        aiohttp_seams.fail_body(resp, Boom("stop"))
        with pytest.raises(Boom):
            await asyncio.wait_for(pending, 5)
        resp.close()
    never.set()


async def test_bytes_received_and_unread_bytes_count_what_arrived_and_what_waits(
    start_upstream: StartUpstream,
) -> None:
    second = asyncio.Event()
    written = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"12345")
        await second.wait()
        await resp.write(b"678")
        written.set()
        await second.wait()
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    up = await start_upstream(app)
    async with aiohttp.ClientSession() as http, http.get(up.url.removesuffix("/v1") + "/") as resp:
        assert await resp.content.readexactly(5) == b"12345"
        assert aiohttp_seams.bytes_received(resp) == 5
        second.set()
        await written.wait()
        for _ in range(100):  # until the client's loop has taken the 3 bytes off the socket
            if aiohttp_seams.bytes_received(resp) == 8:
                break
            await asyncio.sleep(0.01)
        assert aiohttp_seams.bytes_received(resp) == 8  # arrived, not read yet
        assert aiohttp_seams.unread_bytes(resp) == 3
        assert await resp.content.readexactly(3) == b"678"
        assert aiohttp_seams.unread_bytes(resp) == 0
        assert aiohttp_seams.bytes_received(resp) == 8
        resp.close()


def test_needs_cleanup_closed_agrees_with_aiohttp() -> None:
    assert aiohttp_seams.NEEDS_CLEANUP_CLOSED == aiohttp.connector.NEEDS_CLEANUP_CLOSED


async def test_the_connector_settings_raise_no_deprecation_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        connector = aiohttp.TCPConnector(enable_cleanup_closed=aiohttp_seams.NEEDS_CLEANUP_CLOSED)
        await connector.close()


async def test_start_reports_the_port_it_bound() -> None:
    app = create_app(make_config("http://127.0.0.1:9/v1"))
    runner, port = await start(app, "127.0.0.1", 0)
    try:
        assert port != 0 and runner.addresses[0][1] == port
    finally:
        await runner.cleanup()


def test_the_package_uses_no_other_private_aiohttp_attribute() -> None:
    """A `._name` reached on something other than self, outside the seams module, is a new
    private use: it belongs in gateway/aiohttp_seams.py with a test here."""
    private = re.compile(r"\b(?!self\b|cls\b)[a-z_][a-z0-9_]*\._[a-z][a-z0-9_]*")
    found = []
    for path in Path(gateway.__file__).parent.rglob("*.py"):
        if path.name == "aiohttp_seams.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = re.sub(r"\"[^\"]*\"|'[^']*'", "", line.split("#", 1)[0])  # not in strings
            if private.search(code) and "os._exit" not in code and "sys._" not in code:
                found.append(f"{path.name}:{n}: {line.strip()}")
    assert found == []
