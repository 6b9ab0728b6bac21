"""Auth over real sockets: keys by SHA-256, JWTs (HS256, RS256, ES256), modes, models."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import (
    TEST_KEY,
    TEST_KEY_SHA,
    UPSTREAM_KEY,
    Gateway,
    GatewayFactory,
    Upstream,
    chat_body,
)

SECRET = "jwt-test-secret-that-is-long-enough-0123456789"


def token(claims: dict[str, Any] | None = None, key: Any = SECRET, alg: str = "HS256") -> str:
    base = {"sub": "jwt-user", "exp": int(time.time()) + 300}
    base.update(claims or {})
    return jwt.encode({k: v for k, v in base.items() if v is not None}, key, algorithm=alg)


async def chat(
    http: aiohttp.ClientSession, gw: Gateway, headers: dict[str, str], **body: Any
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(stream=False, **body), headers=headers
    ) as resp:
        return resp.status, await resp.json(), resp


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
async def keys_gw(gateway_factory: GatewayFactory, upstream: Upstream) -> Gateway:
    return await gateway_factory(upstream.url, auth={"mode": "keys"})


async def test_a_valid_key_as_bearer_is_accepted(
    keys_gw: Gateway, http: aiohttp.ClientSession
) -> None:
    status, _, _ = await chat(http, keys_gw, bearer(TEST_KEY))
    assert status == 200


async def test_a_valid_key_as_x_api_key_is_accepted(
    keys_gw: Gateway, http: aiohttp.ClientSession
) -> None:
    status, _, _ = await chat(http, keys_gw, {"x-api-key": TEST_KEY})
    assert status == 200


async def test_the_clients_key_is_never_forwarded_upstream(
    keys_gw: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    await chat(http, keys_gw, {"x-api-key": TEST_KEY})
    seen = upstream.state.last_headers
    assert seen["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-api-key" not in seen


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("gw-wrong-key-0123456789abcdefghijklmnop"),
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer "},
        {"x-api-key": TEST_KEY + "x"},
    ],
    ids=["missing", "wrong", "not-bearer", "empty", "longer"],
)
async def test_bad_credentials_are_401_with_www_authenticate_and_openai_json(
    keys_gw: Gateway, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    status, body, resp = await chat(http, keys_gw, headers)
    assert status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert body["error"]["type"] == "authentication_error"
    assert set(body["error"]) == {"message", "type", "code"}
    assert TEST_KEY not in str(body)


async def test_public_routes_need_no_credentials(
    keys_gw: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{keys_gw.url}/healthz") as resp:
        assert resp.status == 200


async def test_an_unknown_route_is_404_not_401(
    keys_gw: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{keys_gw.url}/v1/nope") as resp:
        assert resp.status == 404


async def test_a_model_outside_the_clients_patterns_is_403(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        upstream.url,
        auth={"mode": "keys"},
        keys=[{"client": "tester", "sha256": TEST_KEY_SHA, "models": ["gpt-4o*"]}],
    )
    status, body, _ = await chat(http, gw, bearer(TEST_KEY))
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    status, _, _ = await chat(http, gw, bearer(TEST_KEY), model="gpt-4o-mini")
    assert status == 200


async def test_mode_none_admits_anyone_as_anonymous(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(upstream.url, auth={"mode": "none"})
    status, _, resp = await chat(http, gw, {})
    assert status == 200
    assert "x-ratelimit-limit-requests" not in resp.headers  # no per-client limits


# ------------------------------------------------------------------------------- JWT


@pytest.fixture
async def jwt_gw(gateway_factory: GatewayFactory, upstream: Upstream) -> Gateway:
    return await gateway_factory(
        upstream.url,
        auth={"mode": "jwt"},
        **{"auth.jwt": {"secret": SECRET, "audience": "gateway", "issuer": "https://idp.test"}},
    )


def good(**claims: Any) -> str:
    return token({"aud": "gateway", "iss": "https://idp.test", **claims})


async def test_a_valid_jwt_is_accepted_and_names_the_client(
    jwt_gw: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    status, _, resp = await chat(http, jwt_gw, bearer(good()))
    assert status == 200
    assert resp.headers["x-ratelimit-limit-requests"] == "60"  # the [auth.jwt] default rpm


@pytest.mark.parametrize(
    ("tok", "why"),
    [
        (lambda: good(exp=int(time.time()) - 60), "expired"),
        (lambda: good(nbf=int(time.time()) + 300), "not yet valid"),
        (
            lambda: token({"aud": "gateway", "iss": "https://idp.test"}, key=SECRET + "x"),
            "signature",
        ),
        (lambda: good(aud="someone-else"), "audience"),
        (lambda: token({"iss": "https://idp.test"}), "claim"),
        (lambda: good(iss="https://evil.test"), "issuer"),
        (lambda: good(sub=None), "'sub'"),
        (lambda: jwt.encode({"sub": "x", "aud": "gateway"}, None, algorithm="none"), "algorithm"),
        (lambda: "eyJhbGciOiJIUzI1NiJ9.garbage.garbage", "malformed"),
    ],
    ids=[
        "expired",
        "nbf",
        "wrong-signature",
        "wrong-audience",
        "no-audience",
        "wrong-issuer",
        "no-subject",
        "alg-none",
        "garbage",
    ],
)
async def test_an_invalid_jwt_is_401_saying_why(
    jwt_gw: Gateway, http: aiohttp.ClientSession, tok: Any, why: str
) -> None:
    status, body, resp = await chat(http, jwt_gw, bearer(tok()))
    assert status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert why in body["error"]["message"]
    assert body["error"]["code"] == "invalid_token"


async def test_a_jwt_subject_that_is_a_configured_client_gets_its_limits_and_models(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        upstream.url,
        auth={"mode": "keys+jwt"},
        keys=[{"client": "tester", "sha256": TEST_KEY_SHA, "rpm": 77, "models": ["gpt-4o"]}],
        **{"auth.jwt": {"secret": SECRET}},
    )
    status, _, _ = await chat(http, gw, bearer(token({"sub": "tester"})))
    assert status == 403
    status, _, resp = await chat(http, gw, bearer(token({"sub": "tester"})), model="gpt-4o")
    assert status == 200 and resp.headers["x-ratelimit-limit-requests"] == "77"
    status, _, resp = await chat(http, gw, bearer(token({"sub": "stranger"})))
    assert status == 200 and resp.headers["x-ratelimit-limit-requests"] == "60"


async def test_keys_and_jwts_both_work_in_keys_plus_jwt_mode(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        upstream.url, auth={"mode": "keys+jwt"}, **{"auth.jwt": {"secret": SECRET}}
    )
    assert (await chat(http, gw, bearer(TEST_KEY)))[0] == 200
    assert (await chat(http, gw, bearer(token())))[0] == 200
    assert (await chat(http, gw, bearer(token(key=SECRET + "x"))))[0] == 401


async def test_a_key_is_not_accepted_as_a_jwt_in_jwt_mode(
    jwt_gw: Gateway, http: aiohttp.ClientSession
) -> None:
    assert (await chat(http, jwt_gw, bearer(TEST_KEY)))[0] == 401


def _pem(private: Any, path: Path) -> Path:
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_asymmetric_jwts_are_checked_against_the_public_key_file(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    alg: str,
) -> None:
    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if alg == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    other: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if alg == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = _pem(private, tmp_path / "pub.pem")
    gw = await gateway_factory(
        upstream.url,
        auth={"mode": "jwt"},
        **{"auth.jwt": {"algorithms": [alg], "public_key_file": str(pem)}},
    )
    assert (await chat(http, gw, bearer(token(key=private, alg=alg))))[0] == 200
    assert (await chat(http, gw, bearer(token(key=other, alg=alg))))[0] == 401
    # Algorithm confusion: an HS256 token "signed" with the public key's bytes is refused.
    assert (await chat(http, gw, bearer(_hs256_by_hand(pem.read_bytes()))))[0] == 401


def _hs256_by_hand(key: bytes) -> str:
    # PyJWT itself refuses to sign HS256 with a PEM key; an attacker would not.
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    head = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = b64(b'{"sub":"attacker","exp":%d}' % (int(time.time()) + 300))
    sig = b64(hmac.new(key, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


async def test_a_jwt_without_exp_is_refused_by_default(
    jwt_gw: Gateway, http: aiohttp.ClientSession
) -> None:
    status, body, resp = await chat(http, jwt_gw, bearer(good(exp=None)))
    assert status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert body["error"]["message"] == "Invalid token: missing 'exp' claim"
    assert body["error"]["code"] == "invalid_token"
    assert (await chat(http, jwt_gw, bearer(good())))[0] == 200


async def test_a_jwt_without_exp_is_accepted_when_require_exp_is_false(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        upstream.url,
        auth={"mode": "jwt"},
        **{"auth.jwt": {"secret": SECRET, "require_exp": False}},
    )
    assert (await chat(http, gw, bearer(token({"exp": None}))))[0] == 200
    # Still checked when present.
    assert (await chat(http, gw, bearer(token({"exp": int(time.time()) - 60}))))[0] == 401


@pytest.mark.parametrize("alg", ["PS256", "EdDSA"])
async def test_pss_and_eddsa_jwts_are_checked_against_the_public_key_file(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    alg: str,
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    def make() -> Any:
        if alg == "PS256":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return ed25519.Ed25519PrivateKey.generate()

    private, other = make(), make()
    pem = _pem(private, tmp_path / "pub.pem")
    gw = await gateway_factory(
        upstream.url,
        auth={"mode": "jwt"},
        **{"auth.jwt": {"algorithms": [alg], "public_key_file": str(pem)}},
    )
    assert (await chat(http, gw, bearer(token(key=private, alg=alg))))[0] == 200
    assert (await chat(http, gw, bearer(token(key=other, alg=alg))))[0] == 401
