"""Logs never carry a key, a JWT or an upstream key: unit tests of the redactor, and a test
that captures every line written while requests carry secrets and greps for them."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator

import aiohttp
import jwt
import orjson
import pytest
import structlog

from gateway import logs
from tests.conftest import (
    TEST_KEY,
    UPSTREAM_KEY,
    GatewayFactory,
    Upstream,
    chat_body,
    configured_logs,
)

JWT_SECRET = "plainjwtsecretwithnoshape0123456789"


def test_fields_named_like_credentials_are_masked_whatever_their_value() -> None:
    r = logs.Redactor()
    out = r(None, "", {"authorization": "abc", "x-api-key": "k", "headers": {"Cookie": "c=1"}})
    assert out == {
        "authorization": "[REDACTED]",
        "x-api-key": "[REDACTED]",
        "headers": {"Cookie": "[REDACTED]"},
    }


@pytest.mark.parametrize(
    "text",
    [
        f"bad key {TEST_KEY} sent",
        "upstream said: Incorrect API key provided: sk-proj-abcdefghijklmnop",
        "Authorization: Bearer opaque_token_value",
        "token " + jwt.encode({"sub": "x"}, "s" * 32, algorithm="HS256"),
    ],
)
def test_values_shaped_like_secrets_are_masked(text: str) -> None:
    out = logs.Redactor()(None, "", {"event": text, "nested": [{"detail": text}]})
    assert "[REDACTED]" in out["event"] and out["nested"][0]["detail"] == out["event"]
    for word in text.split():
        if len(word) > 20:
            assert word not in str(out)


def test_configured_literal_secrets_are_masked_even_without_a_shape() -> None:
    out = logs.Redactor([JWT_SECRET])(None, "", {"event": f"x{JWT_SECRET}y", "n": 3})
    assert out == {"event": "x[REDACTED]y", "n": 3}


def test_ordinary_values_pass_untouched() -> None:
    event = {
        "event": "access",
        "path": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "prompt_tokens": 12,
        "request_id": "abc-123.x",
    }
    assert logs.Redactor()(None, "", dict(event)) == event


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The log lines in a buffer, with the config's secrets known to the redactor."""
    with configured_logs([UPSTREAM_KEY, JWT_SECRET]) as buf:
        yield buf


async def test_no_secret_reaches_any_log_line_during_requests(
    captured: io.StringIO,
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(
        upstream.url, auth={"mode": "keys+jwt"}, **{"auth.jwt": {"secret": JWT_SECRET}}
    )
    now = int(time.time())
    good_jwt = jwt.encode({"sub": "tester", "exp": now + 60}, JWT_SECRET, algorithm="HS256")
    expired = jwt.encode({"sub": "tester", "exp": now - 60}, JWT_SECRET, algorithm="HS256")
    forged = jwt.encode(
        {"sub": "tester"}, "not-the-secret-0123456789abcdefghijkl", algorithm="HS256"
    )
    wrong_key = "gw-wrong-0123456789abcdefghijklmnopqrstu"
    secrets = [TEST_KEY, UPSTREAM_KEY, JWT_SECRET, good_jwt, expired, forged, wrong_key]

    url = f"{gw.url}/v1/chat/completions"
    for cred in (TEST_KEY, good_jwt, expired, forged, wrong_key):
        for headers in ({"Authorization": f"Bearer {cred}"}, {"x-api-key": cred}):
            async with http.post(url, json=chat_body(), headers=headers) as r:
                await r.read()
    # Secrets where a careless client puts them: request id, model, query, a Basic header.
    async with http.post(
        url + f"?key={TEST_KEY}",
        json=chat_body(model=TEST_KEY),
        headers={"Authorization": f"Bearer {TEST_KEY}", "X-Request-ID": TEST_KEY},
    ) as r:
        await r.read()
    async with http.get(f"{gw.url}/nope", headers={"Authorization": f"Basic {TEST_KEY}"}) as r:
        await r.read()
    # Library code logging a secret through the standard library, and a careless log call.
    logging.getLogger("aiohttp.client").warning("retrying with key %s", UPSTREAM_KEY)
    structlog.get_logger("x").info("debug", headers={"Authorization": f"Bearer {TEST_KEY}"})

    text = captured.getvalue()
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert sum(1 for e in lines if e.get("event") == "access") == 12
    assert "[REDACTED]" in text
    for secret in secrets:
        assert secret not in text, "a secret reached the logs"


def test_a_value_full_of_jwt_starts_is_scrubbed_in_linear_time() -> None:
    # Every "-eyJ" was a place the JWT pattern started, each scanning to the end of the run:
    # quadratic, so a 64 KB value held the event loop for seconds.
    hostile = "-eyJ" * 16000
    start = time.perf_counter()
    assert logs.Redactor().scrub(hostile, "model") == hostile
    assert time.perf_counter() - start < 1.0
    token = jwt.encode({"sub": "x"}, "s" * 32, algorithm="HS256")
    assert token not in logs.Redactor().scrub(f"{hostile} {token} (sent)", "detail")


async def test_a_huge_model_name_does_not_stall_the_access_line(
    captured: io.StringIO,
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(upstream.url)
    model = "-eyJ" * 16000  # 64 KB, well under max_body_bytes; the access line logs it
    start = time.perf_counter()
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(stream=False, model=model)
    ) as r:
        await r.read()
    elapsed = time.perf_counter() - start
    lines = [orjson.loads(line) for line in captured.getvalue().splitlines()]
    assert any(e.get("event") == "access" and e.get("model") == model for e in lines)
    assert elapsed < 2.0, f"one request took {elapsed:.1f} s (the access line's redaction)"


@pytest.mark.parametrize(
    "value",
    [
        "/v1/chat/completions",
        "127.0.0.1",
        "2026-12-07T04:29:39.123456Z",
        f"x {TEST_KEY}",
        TEST_KEY.upper(),
        "SK-proj-ABCDEFGHIJKLMNOP",
        "bEaReR opaque_token_value",
        "a.EYJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig",
        "\u017fk-proj-abcdefghijklmnop",  # long s: IGNORECASE folds it onto s
        "\u212a",  # Kelvin sign
        "caf\u00e9 gw-",
        "plain words only",
        "",
    ],
)
def test_a_line_judged_clean_in_one_pass_is_what_field_by_field_scrubbing_gives(
    value: str,
) -> None:
    r = logs.Redactor([JWT_SECRET])
    for event in (
        {"event": "access", "model": value, "status": 200, "stream": True},
        {"event": "access", "a": value[: len(value) // 2], "b": value[len(value) // 2 :]},
        {"event": "x", "token": value, "n": None},
        {"event": value, "path": f"/v1/models/{JWT_SECRET}"},
    ):
        expected = {k: r.scrub(v, k) for k, v in event.items()}
        assert r(None, "", dict(event)) == expected
