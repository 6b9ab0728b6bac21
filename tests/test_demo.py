"""The demo page's files over HTTP: content types, CSP, no traversal, the page's settings."""

from __future__ import annotations

import aiohttp
import pytest

from gateway.demo import CSP

from .conftest import Gateway, GatewayFactory, Upstream


@pytest.mark.parametrize(
    ("path", "ctype"),
    [
        ("/", "text/html"),
        ("/static/demo.js", "text/javascript"),
        ("/static/demo.css", "text/css"),
        ("/static/favicon.svg", "image/svg+xml"),
    ],
)
async def test_demo_files_have_their_content_type_and_a_strict_csp(
    http: aiohttp.ClientSession, gateway: Gateway, path: str, ctype: str
) -> None:
    async with http.get(gateway.url + path) as r:
        assert r.status == 200
        assert r.content_type == ctype
        assert r.headers["Content-Security-Policy"] == CSP
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        body = await r.text()
    assert "'unsafe-inline'" not in CSP and "default-src 'none'" in CSP
    if path == "/":
        assert "<script>" not in body and "<style" not in body and "style=" not in body
        assert 'src="/static/demo.js"' in body


@pytest.mark.parametrize(
    "path",
    [
        "/static/../setup.cfg",
        "/static/%2e%2e/setup.cfg",
        "/static/..%2fsetup.cfg",
        "/static/..%2f..%2fsetup.cfg",
        "/static/%2fetc%2fpasswd",
        "/static/demo.py",
        "/static/index.html",
        "/static/",
    ],
)
async def test_no_path_reaches_the_file_system(
    http: aiohttp.ClientSession, gateway: Gateway, path: str
) -> None:
    async with http.get(gateway.url + path) as r:
        assert r.status == 404
        assert (await r.json())["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(("mode", "required"), [("none", False), ("keys", True)])
async def test_demo_config_says_whether_a_key_is_needed(
    http: aiohttp.ClientSession,
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    mode: str,
    required: bool,
) -> None:
    gw = await gateway_factory(upstream.url, auth={"mode": mode})
    async with http.get(gw.url + "/demo/config") as r:
        assert r.status == 200
        assert await r.json() == {"key_required": required, "model": "gpt-4o-mini"}
