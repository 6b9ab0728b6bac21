"""The policy derived from the config, and its reload: keys, limits and CORS swap live."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import aiohttp
import pytest

from gateway.cli import key_block, new_key
from gateway.config import ConfigError, parse
from gateway.policy import POLICY, build_policy
from tests.conftest import TEST_KEY, GatewayFactory, Upstream, chat_body, make_config


def test_the_policy_holds_only_key_hashes_and_precomputed_cors_headers() -> None:
    cfg = make_config(
        "http://127.0.0.1:1/v1", auth={"mode": "keys"}, cors={"allow_origins": ["http://a"]}
    )
    policy = build_policy(cfg)
    assert TEST_KEY not in repr(policy)
    assert hashlib.sha256(TEST_KEY.encode()).hexdigest() in policy.by_hash
    assert policy.cors.preflight["http://a"]["Access-Control-Max-Age"] == "600"
    assert policy.cors.for_actual("http://b") is None


def test_a_key_made_by_keygen_is_accepted_by_its_pasted_block() -> None:
    key = new_key()
    toml = (
        '[auth]\nmode = "keys"\n'
        + key_block("alice", key)
        + ('[[upstreams]]\nname = "u"\nbase_url = "http://127.0.0.1:1/v1"\n')
    )
    policy = build_policy(parse(toml, env={}))
    [(digest, ident)] = policy.by_hash.values()
    assert digest == hashlib.sha256(key.encode()).hexdigest() and ident.client == "alice"
    assert key not in toml


async def test_a_reload_swaps_keys_limits_and_cors_without_dropping_a_stream(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        upstream.url, auth={"mode": "keys"}, cors={"allow_origins": ["http://old.example"]}
    )
    url = f"{gw.url}/v1/chat/completions"
    running = await http.post(
        url,
        json=chat_body(),
        headers={
            "Authorization": f"Bearer {TEST_KEY}",
            "x-mock-chunks": "20",
            "x-mock-delay": "0.02",
        },
    )
    assert running.status == 200
    await running.content.readline()

    fresh = new_key()
    new_cfg = make_config(
        upstream.url,
        auth={"mode": "keys"},
        cors={"allow_origins": ["http://new.example"]},
        keys=[{"client": "fresh", "sha256": hashlib.sha256(fresh.encode()).hexdigest(), "rpm": 42}],
    )
    gw.app[POLICY].replace(new_cfg)

    body = await running.read()  # the stream that started before the reload ends normally
    assert body.endswith(b"data: [DONE]\n\n")
    async with http.post(
        url, json=chat_body(stream=False), headers={"Authorization": f"Bearer {TEST_KEY}"}
    ) as r:
        assert r.status == 401
    async with http.post(
        url,
        json=chat_body(stream=False),
        headers={"Authorization": f"Bearer {fresh}", "Origin": "http://new.example"},
    ) as r:
        assert r.status == 200
        assert r.headers["x-ratelimit-limit-requests"] == "42"
        assert r.headers["Access-Control-Allow-Origin"] == "http://new.example"


async def test_a_reload_that_cannot_build_changes_nothing(
    gateway_factory: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    gw = await gateway_factory(upstream.url, auth={"mode": "keys"})
    before = gw.app[POLICY].current
    pem = tmp_path / "key.pem"
    pem.write_text("not a key")
    good = make_config(upstream.url, auth={"mode": "keys"})
    jwt_cfg = dataclasses.replace(good.auth.jwt, algorithms=("RS256",), public_key_file=str(pem))
    bad = dataclasses.replace(good, auth=dataclasses.replace(good.auth, mode="jwt", jwt=jwt_cfg))
    with pytest.raises(ValueError, match="public_key_file"):
        gw.app[POLICY].prepare_reload(bad)
    assert gw.app[POLICY].current is before


def test_a_public_key_file_that_is_not_a_pem_key_is_a_config_error(tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_text("not a key")
    toml = (
        f'[auth]\nmode = "jwt"\n[auth.jwt]\nalgorithms = ["RS256"]\npublic_key_file = "{pem}"\n'
        '[[upstreams]]\nname = "u"\nbase_url = "http://127.0.0.1:1/v1"\n'
    )
    with pytest.raises(ConfigError) as err:
        parse(toml, env={})
    assert err.value.problems == ["auth.jwt.public_key_file: is not a PEM public key"]


def test_a_short_hmac_secret_is_accepted_with_a_warning() -> None:
    toml = (
        '[auth]\nmode = "jwt"\n[auth.jwt]\nsecret = "${S}"\n'
        '[[upstreams]]\nname = "u"\nbase_url = "http://127.0.0.1:1/v1"\n'
    )
    cfg = parse(toml, env={"S": "short"})
    assert any("auth.jwt.secret: shorter than 32 bytes" in w for w in cfg.warnings)
