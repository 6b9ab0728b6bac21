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
    """`tests.conftest.config_text` with auth on (`auth.mode = "keys"`, one key): the TOML of a
    gateway process whose callers identify themselves."""
    from tests.conftest import config_text as text  # conftest loads this module as a plugin

    sections.setdefault("auth", {"mode": "keys"})
    return text(upstream_url, **sections)
