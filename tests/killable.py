"""Gateways as real processes that a test may SIGKILL (a crash: no release, no cleanup).

Registered from conftest.py (`pytest_plugins`). `serve_process(config_text)` starts
`python -m gateway serve` through `tests.gateway_process.GatewayProcess` (port 0, its URL read
from the "listening" log line); whatever is still running at the end is stopped.
`config_text` writes the TOML `tests.conftest.make_config` builds, for a file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_KEY_SHA, UPSTREAM_KEY, _toml
from tests.gateway_process import GatewayProcess

ServeProcess = Callable[[str], Awaitable[GatewayProcess]]


@pytest.fixture
async def serve_process(tmp_path: Path) -> AsyncIterator[ServeProcess]:
    procs: list[GatewayProcess] = []

    async def go(config_text: str) -> GatewayProcess:
        cfg = tmp_path / f"gateway-{len(procs)}.toml"
        cfg.write_text(config_text)
        gw = await GatewayProcess.start(cfg)
        procs.append(gw)
        return gw

    yield go
    for gw in procs:
        await gw.close()


def config_text(upstream_url: str, **sections: dict[str, Any]) -> str:
    """The TOML of `tests.conftest.make_config` for a process: one key, one upstream."""
    base: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace": 2},
        "logging": {"level": "info", "format": "json"},
    }
    keys = sections.pop("keys", [{"client": "tester", "sha256": TEST_KEY_SHA}])
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
    for k in keys:
        lines.append("[[auth.keys]]")
        lines.extend(f"{a} = {_toml(b)}" for a, b in k.items())
    lines.append("[[upstreams]]")
    upstream = {"name": "mock", "base_url": upstream_url, "api_key": UPSTREAM_KEY}
    lines.extend(f"{a} = {_toml(b)}" for a, b in upstream.items())
    return "\n".join(lines) + "\n"
