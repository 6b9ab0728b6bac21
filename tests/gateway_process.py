"""The gateway as a real process (`python -m gateway serve --config PATH`), for signal tests.

Its stdout (JSON log lines) is collected as it comes, so tests wait for log events instead
of sleeping: `await gw.wait_log("listening")`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.port = 0

    @classmethod
    async def start(
        cls, config_path: Path, env: Mapping[str, str] | None = None, *, listening: bool = True,
        args: Sequence[str] = (),
    ) -> GatewayProcess:
        # Never the caller's own NOTIFY_SOCKET (a test run under systemd): only the test's.
        full_env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config_path), *args,
            cwd=ROOT, env=full_env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        gw = cls(proc)
        if listening:
            gw.port = (await gw.wait_log("listening"))["port"]
        return gw

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            text = raw.decode(errors="replace").rstrip("\n")
            try:
                line = json.loads(text)
            except ValueError:
                line = {"event": "raw", "text": text}
            if not isinstance(line, dict):
                line = {"event": "raw", "text": text}
            self.lines.append(line)
            self._changed.set()
        self._changed.set()

    def events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            line for line in self.lines
            if line.get("event") == event and all(line.get(k) == v for k, v in match.items())
        ]

    async def wait_log(
        self, event: str, *, count: int = 1, timeout: float = 30.0, **match: Any
    ) -> dict[str, Any]:
        """The `count`-th log line with this event (and these fields)."""
        async with asyncio.timeout(timeout):
            while True:
                found = self.events(event, **match)
                if len(found) >= count:
                    return found[count - 1]
                if self._reader.done():
                    raise AssertionError(f"process ended before {event!r}: {self.lines[-20:]}")
                self._changed.clear()
                await self._changed.wait()

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    async def close(self) -> None:
        """Teardown: make sure nothing is left running."""
        if self.proc.returncode is None:
            # TERM first: a supervisor then stops its workers too.
            self.proc.terminate()
            try:
                async with asyncio.timeout(15):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._reader
