"""No client key, JWT, JWT secret or upstream key gets out: not in a response (status line,
headers, body), not in a log line, not in a metric label, whatever the error path.

The gateway runs as `python -m gateway serve` in a subprocess, configured as in production
(JSON logs on stdout, secrets from the environment), so what is grepped is exactly what an
operator's journal and a client would see."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from gateway.mock_upstream import MockSettings, create_mock_app

from .conftest import TEST_KEY, UPSTREAM_KEY, StartUpstream, chat_body

JWT_SECRET = "jwt-signing-secret-Zq8vN3kT5wR1yH7mC2pL-0123456789"
CLIENT_JWT = jwt.encode({"sub": "tester", "aud": "gw"}, JWT_SECRET, algorithm="HS256")
FORGED_JWT = jwt.encode(
    {"sub": "tester", "aud": "gw"}, "not-the-secret-xxxxxxxxxxxxxxxxxxxxxxxx", algorithm="HS256"
)
WRONG_KEY = TEST_KEY[:-4] + "zzzz"  # a near miss is a secret too (a typo of the real one)
SECRETS = {
    "client key": TEST_KEY,
    "wrong client key": WRONG_KEY,
    "client JWT": CLIENT_JWT,
    "forged JWT": FORGED_JWT,
    "JWT secret": JWT_SECRET,
    "upstream key": UPSTREAM_KEY,
}


def fragments(secret: str) -> list[str]:
    """The secret and distinctive pieces of it: a truncated or sliced leak counts too."""
    core = secret.split("-", 2)[-1] if secret.startswith(("gw-", "sk-")) else secret
    return [secret] + [core[i : i + 16] for i in range(0, max(1, len(core) - 16), 8)]


@web.middleware
async def echo_credentials(request: web.Request, handler: Any) -> web.StreamResponse:
    """An upstream that quotes the credential it was sent in its 401, as real ones do."""
    if request.headers.get("x-fault") == "echo-auth":
        auth = request.headers.get("Authorization", "")
        body = {
            "error": {
                "message": f"Incorrect API key provided: {auth}.",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        }
        return web.json_response(body, status=401)
    return await handler(request)


@pytest.fixture
async def gateway_process(
    start_upstream: StartUpstream, tmp_path: Path
) -> AsyncIterator[tuple[str, list[str]]]:
    app = create_mock_app(MockSettings(chunks=3, delay=0.0, api_key=UPSTREAM_KEY))
    app.middlewares.append(echo_credentials)
    up = await start_upstream(app)
    sha = hashlib.sha256(TEST_KEY.encode()).hexdigest()
    conf = tmp_path / "config.toml"
    conf.write_text(f"""
[server]
host = "127.0.0.1"
port = 0
shutdown_grace = 1
[auth]
mode = "keys+jwt"
[[auth.keys]]
client = "tester"
sha256 = "{sha}"
[auth.jwt]
secret = "${{GW_JWT_SECRET}}"
audience = "gw"
[limits]
per_ip_rpm = 0
[[upstreams]]
name = "mock"
base_url = "{up.url}"
api_key = "${{GW_UPSTREAM_KEY}}"
first_byte_timeout = 0.5
# The faults below reach the upstream only when passed (headers are an allow-list).
pass_headers = ["x-mock-*", "x-fault"]
[retry]
attempts = 1
[logging]
level = "debug"
format = "json"
""")
    env = {
        **os.environ,
        "GW_JWT_SECRET": JWT_SECRET,
        "GW_UPSTREAM_KEY": UPSTREAM_KEY,
        "PYTHONUNBUFFERED": "1",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(conf),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    port = None
    async with asyncio.timeout(20):
        while port is None:
            line = (await proc.stdout.readline()).decode()
            assert line, "gateway exited: " + (await proc.stderr.read()).decode()
            lines.append(line)
            if '"listening"' in line:
                port = json.loads(line)["port"]
    pump = asyncio.create_task(_pump(proc.stdout, lines))
    try:
        yield f"http://127.0.0.1:{port}", lines
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)
        await pump
        lines.append((await proc.stderr.read()).decode())


async def _pump(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode())


def battery() -> list[tuple[str, str, dict[str, str], bytes | None]]:
    """(method, path, headers, body): bad requests carrying secrets wherever a client might."""
    good = json.dumps(chat_body()).encode()
    cases: list[tuple[str, str, dict[str, str], bytes | None]] = []
    creds = [
        {"Authorization": f"Bearer {TEST_KEY}"},
        {"Authorization": f"Bearer {WRONG_KEY}"},
        {"x-api-key": WRONG_KEY},
        {"Authorization": f"Bearer {CLIENT_JWT}"},
        {"Authorization": f"Bearer {FORGED_JWT}"},
        {"Authorization": f"Basic {TEST_KEY}"},
        {"Authorization": TEST_KEY},
        {"Authorization": f"Bearer {TEST_KEY}", "x-api-key": WRONG_KEY},
        {},
    ]
    bodies: list[bytes | None] = [
        good,
        b"{not json " + TEST_KEY.encode(),
        json.dumps({"model": TEST_KEY, "messages": []}).encode(),
        json.dumps({"model": "m", "messages": [{"role": JWT_SECRET}]}).encode(),
        json.dumps(
            {"model": CLIENT_JWT, "stream": "yes", "messages": [{"role": "user", "content": "x"}]}
        ).encode(),
        json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 2_000_000}])).encode(),
    ]
    for h in creds:
        for b in bodies:
            cases.append(("POST", "/v1/chat/completions", h, b))
        cases.append(("GET", f"/v1/models/{TEST_KEY}", h, None))
        cases.append(("GET", f"/v1/nope?api_key={TEST_KEY}&token={CLIENT_JWT}", h, None))
        cases.append(("DELETE", "/v1/chat/completions", h, None))
        cases.append(("GET", f"/v1/streams/{CLIENT_JWT}", h, None))
        cases.append(("POST", "/v1/streams", h, b"{bad"))
        cases.append(("GET", "/v1/usage", h, None))
        # Upstream error paths: a 401 quoting the upstream key, 5xx, a stall, a cut stream.
        for fault in (
            {"x-fault": "echo-auth"},
            {"x-mock-status": "503"},
            {"x-mock-status": "401"},
            {"x-mock-first-byte-delay": "1"},
            {"x-mock-fail-after": "2"},
        ):
            cases.append(("POST", "/v1/chat/completions", {**h, **fault}, good))
        # A secret where a request id or an arbitrary forwarded header goes.
        cases.append(
            (
                "GET",
                "/healthz",
                {**h, "X-Request-ID": TEST_KEY, "x-secret": JWT_SECRET, "traceparent": CLIENT_JWT},
                None,
            )
        )
    return cases


async def test_no_secret_in_any_response_log_line_or_metric(
    gateway_process: tuple[str, list[str]],
) -> None:
    base, lines = gateway_process
    captured: list[str] = []
    statuses: list[int] = []
    cases = battery()
    async with aiohttp.ClientSession() as http:
        for method, path, headers, body in cases:
            send = {"Content-Type": "application/json", **headers} if body is not None else headers
            payload = io.BytesIO(body) if body is not None else None
            async with http.request(method, base + path, headers=send, data=payload) as resp:
                data = await resp.read()
                statuses.append(resp.status)
                # The request id is the one header that may repeat what this client sent.
                shown = {k: v for k, v in resp.headers.items() if k.lower() != "x-request-id"}
                captured.append(
                    f"{resp.status} {resp.reason} {shown} {data.decode(errors='replace')}"
                )
                rid = resp.headers.get("X-Request-ID", "")
                if rid == headers.get("X-Request-ID"):
                    continue
                assert TEST_KEY not in rid
        async with http.get(base + "/metrics") as resp:
            captured.append(await resp.text())
    await asyncio.sleep(0.3)  # the last access lines
    logs = "".join(lines)
    assert logs.count('"access"') >= len(cases) - 5  # the log really was captured
    assert any(s >= 400 for s in statuses) and any(s == 200 for s in statuses)
    # The faults reached the upstream: the echoing 401 was relayed (with the key scrubbed).
    assert any(c.startswith("401") and "Incorrect API key provided" in c for c in captured)
    everything = "\n".join(captured) + logs
    leaks = [
        (name, frag)
        for name, secret in SECRETS.items()
        for frag in fragments(secret)
        if frag in everything
    ]
    assert leaks == [], leaks
    assert "Traceback" not in everything


async def test_an_upstream_error_quoting_the_key_is_scrubbed_in_detached_streams_and_responses(
    gateway_process: tuple[str, list[str]],
) -> None:
    """The detached stream's `fail` event and a background response's creation error carry
    the upstream's error object: never with the upstream's key in it."""
    base, lines = gateway_process
    auth = {"Authorization": f"Bearer {TEST_KEY}", "x-fault": "echo-auth"}
    captured: list[str] = []
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/v1/streams", json=chat_body(), headers=auth) as resp:
            assert resp.status == 201
            url = (await resp.json())["url"]
        async with http.get(base + url) as resp:
            captured.append(await resp.text())
        body = {"model": "mock-gpt", "input": "hi", "background": True}
        async with http.post(base + "/v1/responses", json=body, headers=auth) as resp:
            captured.append(f"{resp.status} {await resp.text()}")
    assert "event: fail" in captured[0] and "Incorrect API key provided" in captured[0]
    assert captured[1].startswith("401") and "Incorrect API key provided" in captured[1]
    everything = "\n".join(captured) + "".join(lines)
    assert [f for f in fragments(UPSTREAM_KEY) if f in everything] == []
