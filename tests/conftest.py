"""Test harness: real servers on loopback ports, never mocks on the streaming path.

- `upstream`: the bundled mock upstream on a real port (its `MockState` records what it saw).
- `start_upstream(app)`: any small fault-injecting upstream app on a real port.
- `gateway_factory(**overrides)`: the gateway started exactly as `gateway serve` starts it
  (real AppRunner, handler cancellation, its own ClientSession), pointed at an upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import config, logs
from gateway.app import create_app
from gateway.mock_upstream import MOCK_STATE, MockSettings, MockState, create_mock_app
from gateway.process.server import start

from .staging import Stage, make_stage

# A real redis-server for the Redis backend's tests (fixtures `redis_server`, `redis_url`),
# a gateway as a real process to SIGKILL (`serve_process`), and an upstream whose streams
# the limit tests hold open (`gates`), the Redis deployments (TLS, Sentinel, Cluster) and an
# OTLP/HTTP trace receiver (`otlp_receiver`).
pytest_plugins = [
    "tests.redis_server",
    "tests.killable",
    "tests.gates",
    "tests.redis_deployments",
    "tests.otlp_receiver",
]

TEST_KEY = "gw-test-key-0123456789abcdefghijklmnopqrstuvwxyz"
TEST_KEY_SHA = hashlib.sha256(TEST_KEY.encode()).hexdigest()
UPSTREAM_KEY = "sk-upstream-secret-0123456789abcdef"


@dataclass
class Upstream:
    server: TestServer
    url: str  # base_url for the config: http://127.0.0.1:PORT/v1

    @property
    def state(self) -> MockState:
        return self.server.app[MOCK_STATE]


@dataclass
class Gateway:
    app: web.Application
    runner: web.AppRunner
    port: int
    cfg: config.Config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


StartUpstream = Callable[[web.Application], Awaitable[Upstream]]


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    servers: list[TestServer] = []

    async def go(app: web.Application) -> Upstream:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Upstream(server, f"http://127.0.0.1:{server.port}/v1")

    yield go
    for s in servers:
        await s.close()


@pytest.fixture
async def upstream(start_upstream: StartUpstream) -> Upstream:
    """The bundled mock, fast: 5 chunks, no delay, requiring the upstream key."""
    return await start_upstream(
        create_mock_app(MockSettings(chunks=5, delay=0.0, api_key=UPSTREAM_KEY))
    )


def make_config(upstream_url: str, **sections: dict[str, Any]) -> config.Config:
    """A test config: one key (TEST_KEY), one upstream; `sections` override/extend tables."""
    return config.parse(config_text(upstream_url, **sections), source="test", env={})


def config_text(upstream_url: str, **sections: dict[str, Any]) -> str:
    """The TOML text of `make_config` (for a gateway started as a process from a file)."""
    base: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace": 2},
        "auth": {"mode": "none"},
        "limits": {"per_ip_rpm": 0},
        "logging": {"level": "info", "format": "json"},
    }
    upstreams = sections.pop("upstreams", None)
    keys = sections.pop("keys", None)
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
    for k in keys if keys is not None else [{"client": "tester", "sha256": TEST_KEY_SHA}]:
        lines.append("[[auth.keys]]")
        lines.extend(f"{a} = {_toml(b)}" for a, b in k.items())
    for u in upstreams if upstreams is not None else [{}]:
        lines.append("[[upstreams]]")
        # The mock upstream takes its fault injections as x-mock-* headers; the tests' fault
        # and gated upstreams (tests/test_faults.py, tests/gates.py) x-fault and x-gate.
        u = {
            "name": "mock",
            "base_url": upstream_url,
            "api_key": UPSTREAM_KEY,
            "pass_headers": ["x-mock-*", "x-fault", "x-gate"],
            **u,
        }
        lines.extend(f"{a} = {_toml(b)}" for a, b in u.items())
    return "\n".join(lines) + "\n"


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table
        return "{" + ", ".join(f"{_toml(k)} = {_toml(x)}" for k, x in v.items()) + "}"
    return str(v)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway_factory() -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def go(upstream_url: str, **sections: dict[str, Any]) -> Gateway:
        cfg = make_config(upstream_url, **sections)
        app = create_app(cfg)
        runner, port = await start(app, "127.0.0.1", 0, shutdown_timeout=2)
        gw = Gateway(app, runner, port, cfg)
        started.append(gw)
        return gw

    yield go
    for gw in started:
        await gw.runner.cleanup()


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, upstream: Upstream) -> Gateway:
    return await gateway_factory(upstream.url)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class HeldStreams:
    """An upstream app whose chat streams send one event, then wait for `release`.

    It reads each request body and drops it (it keeps nothing of a prompt); `started` is set
    once `count` streams have sent their first event."""

    def __init__(self, count: int = 1) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self._count = count
        self._sent = 0
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._stream)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        while await request.content.readany():
            pass
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n')
        self._sent += 1
        if self._sent == self._count:
            self.started.set()
        await self.release.wait()
        await out.write(b"data: [DONE]\n\n")
        return out


def chat_body(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": "mock-gpt",
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": stream,
        **extra,
    }


@pytest.fixture
def stage(tmp_path: Path) -> Stage:
    """A DESTDIR with Debian's nginx layout and stand-ins for the system's tools."""
    return make_stage(tmp_path)


@contextlib.contextmanager
def configured_logs(secrets: Sequence[str] = ()) -> Iterator[io.StringIO]:
    """Logging configured as `gateway serve` does, into a buffer; restored afterwards."""
    buf = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiohttp.access").disabled)
    logs.configure(config.LoggingConfig(), buf, secrets=secrets)
    try:
        yield buf
    finally:
        structlog.reset_defaults()
        root.handlers[:], _, logging.getLogger("aiohttp.access").disabled = saved
        root.setLevel(saved[1])


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The gateway's log lines, as `gateway serve` writes them, in a buffer."""
    with configured_logs() as buf:
        yield buf
