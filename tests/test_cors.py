"""CORS over real sockets: allow-list, preflights, headers on errors and streams."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import TEST_KEY, Gateway, GatewayFactory, Upstream, chat_body

ALLOWED = "http://app.example"
REFUSED = "http://evil.example"


@pytest.fixture
async def gw(gateway_factory: GatewayFactory, upstream: Upstream) -> Gateway:
    return await gateway_factory(
        upstream.url, auth={"mode": "keys"}, cors={"allow_origins": [ALLOWED], "max_age": 321}
    )


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def test_cors_preflight_from_an_allowed_origin_is_204_with_what_may_be_sent(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.options(f"{gw.url}/v1/chat/completions", headers=preflight(ALLOWED)) as r:
        assert r.status == 204
        h = r.headers
        assert h["Access-Control-Allow-Origin"] == ALLOWED
        assert {m.strip() for m in h["Access-Control-Allow-Methods"].split(",")} >= {
            "GET",
            "POST",
            "DELETE",
        }
        allowed = {x.strip().lower() for x in h["Access-Control-Allow-Headers"].split(",")}
        assert allowed >= {
            "authorization",
            "content-type",
            "last-event-id",
            "x-request-id",
            "x-api-key",
        }
        assert h["Access-Control-Max-Age"] == "321"
        assert "Origin" in h["Vary"]
        assert "Access-Control-Allow-Credentials" not in h


async def test_cors_preflight_allows_the_headers_the_openai_js_sdk_sends(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    """The official JS SDK in a browser sends its own headers (x-stainless-*, OpenAI-Beta,
    Idempotency-Key...): a fixed list would fail its preflight. What reaches an upstream is
    the gateway's allow-list anyway, so an allowed origin may send any well-formed header."""
    asked = "authorization, content-type, x-stainless-os, x-stainless-lang, openai-beta"
    headers = {**preflight(ALLOWED), "Access-Control-Request-Headers": asked}
    async with http.options(f"{gw.url}/v1/chat/completions", headers=headers) as r:
        assert r.status == 204
        allowed = {x.strip().lower() for x in r.headers["Access-Control-Allow-Headers"].split(",")}
        assert allowed >= {h.strip() for h in asked.split(",")} | {"last-event-id", "x-api-key"}
        assert "Access-Control-Request-Headers" in r.headers["Vary"]
    # Not a header list: the fixed list, nothing echoed.
    bad = {**preflight(ALLOWED), "Access-Control-Request-Headers": "x-a, <script>"}
    async with http.options(f"{gw.url}/v1/chat/completions", headers=bad) as r:
        assert r.status == 204
        assert "script" not in r.headers["Access-Control-Allow-Headers"]


async def test_cors_preflight_from_a_refused_origin_is_403_without_cors_headers(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.options(f"{gw.url}/v1/chat/completions", headers=preflight(REFUSED)) as r:
        assert r.status == 403
        assert (await r.json())["error"]["type"] == "permission_error"
        assert not [k for k in r.headers if k.lower().startswith("access-control-")]


async def test_a_preflight_needs_no_credentials_even_for_a_stream_route(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.options(f"{gw.url}/v1/models", headers=preflight(ALLOWED)) as r:
        assert r.status == 204


async def test_an_allowed_origin_can_read_the_answer_and_its_exposed_headers(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    headers = {"Origin": ALLOWED, "Authorization": f"Bearer {TEST_KEY}"}
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(stream=True), headers=headers
    ) as r:
        assert r.status == 200
        await r.read()
        assert r.headers["Access-Control-Allow-Origin"] == ALLOWED
        exposed = {x.strip().lower() for x in r.headers["Access-Control-Expose-Headers"].split(",")}
        assert exposed >= {
            "x-request-id",
            "retry-after",
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        }
        assert "Origin" in r.headers["Vary"]


async def test_a_rendered_error_still_carries_cors_headers(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(), headers={"Origin": ALLOWED}
    ) as r:
        assert r.status == 401
        assert r.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_a_refused_origin_gets_no_cors_headers(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    headers = {"Origin": REFUSED, "Authorization": f"Bearer {TEST_KEY}"}
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(stream=False), headers=headers
    ) as r:
        assert r.status == 403
        assert not [k for k in r.headers if k.lower().startswith("access-control-")]
        assert "Origin" in r.headers["Vary"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/streams"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/m"),
    ],
)
@pytest.mark.parametrize("origin", [REFUSED, "null", "http://app.example.evil.example"])
async def test_cors_disallowed_origin_is_403_before_anything_reaches_the_upstream(
    gw: Gateway,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    origin: str,
) -> None:
    headers = {"Origin": origin, "Authorization": f"Bearer {TEST_KEY}"}
    body = chat_body(stream=False) | {"input": "x"} if method == "POST" else None
    async with http.request(method, gw.url + path, json=body, headers=headers) as r:
        assert r.status == 403
        err = (await r.json())["error"]
    assert err["type"] == "permission_error" and err["code"] == "cors_origin"
    assert upstream.state.requests == {}


async def test_cors_allowed_origin_and_no_origin_are_served(
    gw: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    auth = {"Authorization": f"Bearer {TEST_KEY}"}
    for extra in ({}, {"Origin": ALLOWED}):
        async with http.post(
            f"{gw.url}/v1/chat/completions", json=chat_body(stream=False), headers=auth | extra
        ) as r:
            assert r.status == 200
    assert upstream.state.requests["/v1/chat/completions"] == 2


async def test_a_same_origin_request_is_served_without_cors_headers(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    """The demo page served by the gateway posts to its own host with that Origin."""
    headers = {"Origin": gw.url, "Authorization": f"Bearer {TEST_KEY}"}
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(stream=False), headers=headers
    ) as r:
        assert r.status == 200
        assert not [k for k in r.headers if k.lower().startswith("access-control-")]


async def test_a_request_without_origin_gets_no_cors_headers(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gw.url}/healthz") as r:
        assert not [k for k in r.headers if k.lower().startswith("access-control-")]


async def test_credentials_mode_echoes_the_origin_and_says_so(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        upstream.url, cors={"allow_origins": [ALLOWED], "allow_credentials": True}
    )
    async with http.options(f"{gw.url}/v1/models", headers=preflight(ALLOWED)) as r:
        assert r.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert r.headers["Access-Control-Allow-Credentials"] == "true"


async def test_a_wildcard_without_credentials_allows_any_origin_with_a_star(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(upstream.url, cors={"allow_origins": ["*"]})
    async with http.get(f"{gw.url}/healthz", headers={"Origin": REFUSED}) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"
