"""What reaches the upstream: one quoted path segment per model id, no redirect followed,
and only the allow-listed request headers (gateway.upstream.pool)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from .conftest import UPSTREAM_KEY, GatewayFactory, StartUpstream, Upstream, chat_body


@dataclass
class Seen:
    raw_paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


def recording_app(seen: Seen, *, redirect: bool = False) -> web.Application:
    """An upstream that records each request's raw target and headers, answering any path."""

    async def anything(request: web.Request) -> web.StreamResponse:
        seen.raw_paths.append(request.raw_path)
        seen.headers.append({k.lower(): v for k, v in request.headers.items()})
        await request.read()
        if redirect:
            return web.Response(
                status=302,
                headers={"Location": "/v1/files?stolen=1"},
                body=b'{"moved": true}',
                content_type="application/json",
            )
        if request.path == "/v1/chat/completions":
            return web.json_response(
                {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}
            )
        return web.json_response({"id": "m", "object": "model"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


@pytest.fixture
async def seen() -> Seen:
    return Seen()


@pytest.fixture
async def recorder(start_upstream: StartUpstream, seen: Seen) -> Upstream:
    return await start_upstream(recording_app(seen))


HOSTILE = [
    "a%2F..%2F..%2Ffiles%3Fx=1",
    "..",
    "%2e%2e",
    ".",
    "%2E",
    "a%2Fb",
    "a%5C..%5C..%5Cfiles",
    "a%3Fb=1",
    "a%23frag",
    "a%00b",
    "%00",
    "a%0d%0aX-Injected:%201",
    "x" * 600,
    "%2e%2e%2f%2e%2e%2ffiles",
    "..%2f",
    "a%20b",
    "%ff%fe",
    "mod%C3%A9le",
]


@pytest.mark.parametrize("model", HOSTILE)
async def test_a_hostile_model_id_is_one_encoded_segment_or_refused(
    gateway_factory: GatewayFactory,
    recorder: Upstream,
    seen: Seen,
    http: aiohttp.ClientSession,
    model: str,
) -> None:
    gw = await gateway_factory(recorder.url)
    url = aiohttp.client.URL(f"{gw.url}/v1/models/{model}", encoded=True)
    async with http.get(url) as r:
        body = await r.read()
        status = r.status
    if status in (400, 404):
        assert b'"error"' in body
        assert seen.raw_paths == []
        return
    assert status == 200, body[:200]
    [path] = seen.raw_paths
    assert path.startswith("/v1/models/")
    segment = path.removeprefix("/v1/models/")
    # Exactly one segment: nothing that ends it or walks elsewhere survives unencoded.
    for c in "/?#\\ \r\n\0":
        assert c not in segment, path
    assert segment not in ("", ".", "..")
    assert "%2e%2e" != segment.lower()
    # And it decodes back to the id the client named.
    assert aiohttp.client.URL(f"/x/{segment}", encoded=True).parts[-1] == aiohttp.client.URL(
        f"/x/{model}", encoded=True
    ).parts[-1]


async def test_the_model_list_path_is_exact(
    gateway_factory: GatewayFactory, recorder: Upstream, seen: Seen, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(recorder.url)
    async with http.get(f"{gw.url}/v1/models") as r:
        assert r.status == 200
    assert seen.raw_paths == ["/v1/models"]


async def test_an_upstream_redirect_is_relayed_as_sent_and_not_followed(
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    seen: Seen,
    http: aiohttp.ClientSession,
) -> None:
    up = await start_upstream(recording_app(seen, redirect=True))
    gw = await gateway_factory(up.url)
    async with http.get(f"{gw.url}/v1/models/m", allow_redirects=False) as r:
        assert r.status == 302
        assert await r.read() == b'{"moved": true}'
    assert seen.raw_paths == ["/v1/models/m"]
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(stream=False), allow_redirects=False
    ) as r:
        assert r.status == 302
    assert seen.raw_paths == ["/v1/models/m", "/v1/chat/completions"]


REFUSED_HEADERS = {
    "X-Original-URL": "/v1/files",
    "X-Rewrite-URL": "/v1/files",
    "X-HTTP-Method-Override": "DELETE",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-For": "203.0.113.9",
    "X-Real-IP": "203.0.113.9",
    "X-Vendor-Foo": "bar",
    "User-Agent": "sneaky/1.0",
    "Cookie": "session=abc",
    "x-api-key": "gw-client-key",
    "Proxy-Authorization": "Basic eDp5",
}
ALLOWED_HEADERS = {
    "Accept": "application/json",
    "OpenAI-Beta": "assistants=v2",
    "Idempotency-Key": "idem-123",
}
ACCOUNT_HEADERS = {"OpenAI-Organization": "org-1", "OpenAI-Project": "proj-1"}


@pytest.mark.parametrize("account", [False, True], ids=["default", "forward_openai_headers"])
@pytest.mark.parametrize("route", ["chat", "models", "streams"])
async def test_only_allow_listed_headers_reach_the_upstream(
    gateway_factory: GatewayFactory,
    recorder: Upstream,
    seen: Seen,
    http: aiohttp.ClientSession,
    account: bool,
    route: str,
) -> None:
    gw = await gateway_factory(
        recorder.url,
        upstreams=[{"pass_headers": [], "forward_openai_headers": account}],
    )
    sent = {
        **REFUSED_HEADERS,
        **ALLOWED_HEADERS,
        **ACCOUNT_HEADERS,
        "X-Request-ID": "client-chosen-id",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    if route == "chat":
        async with http.post(
            f"{gw.url}/v1/chat/completions", json=chat_body(stream=False), headers=sent
        ) as r:
            assert r.status == 200
    elif route == "models":
        async with http.get(f"{gw.url}/v1/models", headers=sent) as r:
            assert r.status == 200
    else:
        async with http.post(f"{gw.url}/v1/streams", json=chat_body(), headers=sent) as r:
            assert r.status == 201
        for _ in range(200):  # the generation sends its request on its own task
            if seen.headers:
                break
            await asyncio.sleep(0.01)
    [got] = seen.headers[:1]
    for name in REFUSED_HEADERS:
        assert name.lower() not in got, name
    for name, value in ALLOWED_HEADERS.items():
        assert got[name.lower()] == value
    for name, value in ACCOUNT_HEADERS.items():
        assert (got.get(name.lower()) == value) if account else name.lower() not in got
    assert got["authorization"] == f"Bearer {UPSTREAM_KEY}"
    # The gateway's own request id and span, not the client's.
    assert got["x-request-id"] == "client-chosen-id"  # a valid id is taken from the request
    assert not got["traceparent"].endswith("b7ad6b7169203331-01")
    allowed = {"accept", "openai-beta", "idempotency-key", "x-request-id", "traceparent"}
    allowed |= {"authorization", "content-type", "content-length", "host", "accept-encoding"}
    allowed |= {k.lower() for k in ACCOUNT_HEADERS} if account else set()
    assert set(got) <= allowed, set(got) - allowed


async def test_pass_headers_lets_more_through_but_never_a_credential(
    gateway_factory: GatewayFactory, recorder: Upstream, seen: Seen, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(recorder.url, upstreams=[{"pass_headers": ["x-vendor-*"]}])
    async with http.get(
        f"{gw.url}/v1/models", headers={"X-Vendor-Foo": "1", "X-Other": "2", "x-api-key": "k"}
    ) as r:
        assert r.status == 200
    [got] = seen.headers
    assert got["x-vendor-foo"] == "1"
    assert "x-other" not in got and "x-api-key" not in got


@pytest.mark.parametrize("value", ["inf", "1e999", "9" * 400, "nan"])
async def test_an_upstream_429_with_an_absurd_retry_after_is_still_relayed_as_a_429(
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    http: aiohttp.ClientSession,
    value: str,
) -> None:
    # float() reads "inf", "1e999" and 400 nines as infinity; math.ceil(inf) raised
    # OverflowError, and the client got a 500 instead of the upstream's 429.
    async def throttled(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {"error": {"message": "slow down", "type": "rate_limit_error"}},
            status=429,
            headers={"Retry-After": value},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", throttled)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url, retry={"attempts": 1})
    async with http.get(f"{gw.url}/v1/models") as r:
        assert r.status == 429, await r.text()
        assert int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["message"] == "slow down"


@pytest.mark.parametrize("status", [200, 302, 308])
async def test_an_answer_quoting_the_upstream_key_never_carries_it_whatever_its_status(
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    http: aiohttp.ClientSession,
    status: int,
) -> None:
    # Only answers of 400 and up were scrubbed: a redirect (relayed as sent, never followed)
    # or a 200 echoing the request's Authorization put our upstream key in the client's hands.
    async def echo(request: web.Request) -> web.Response:
        await request.read()
        body = {"object": "model", "id": "m", "seen": request.headers.get("Authorization")}
        headers = {"Location": "https://elsewhere.example/"} if status != 200 else {}
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url, retry={"attempts": 1})
    async with http.get(f"{gw.url}/v1/models/m", allow_redirects=False) as r:
        assert r.status == status
        body = await r.read()
    assert b"seen" in body
    assert UPSTREAM_KEY.encode() not in body
