"""`make run`, the Makefile run for real: both ports checked before anything starts, the
gateway exec'd (a signal to make's child reaches it, and the mock goes with it), the demo
key's hash never silently empty."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_service import free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is absent")


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "NOTIFY_SOCKET")}
    if extra_path is not None:
        env["PATH"] = f"{extra_path}:{env['PATH']}"
    return env


def _config(tmp: Path, port: int) -> Path:
    path = tmp / "config.toml"
    path.write_text((ROOT / "config.toml").read_text().replace("port = 8080", f"port = {port}"))
    return path


def _argv(tmp: Path, run_port: int, mock_port: int) -> list[str]:
    return ["make", "-s", "run", f"RUN_PORT={run_port}", f"MOCK_PORT={mock_port}",
            f"CONFIG={_config(tmp, run_port)}", f"DEMO_KEY={tmp / 'local/demo.key'}"]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def squatter() -> Iterator[int]:
    """Something else listening on a loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("which", ["gateway", "mock"])
def test_make_run_refuses_a_taken_port_and_says_so(
    which: str, squatter: int, tmp_path: Path
) -> None:
    free = free_port()
    run_port, mock_port = (squatter, free) if which == "gateway" else (free, squatter)
    run = subprocess.run(_argv(tmp_path, run_port, mock_port), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert f"127.0.0.1:{squatter} is in use" in run.stderr
    assert not _listening(free)  # neither the gateway nor the mock started


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_make_run_execs_the_gateway_with_a_working_demo_key(tmp_path: Path) -> None:
    # A sha256sum that fails: the old recipe's `export X=$(... | sha256sum | cut ...)` went on
    # with an empty hash, and every request was a 401.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sha256sum").write_text("#!/bin/sh\nexit 1\n")
    (fake / "sha256sum").chmod(0o755)
    run_port, mock_port = free_port(), free_port()
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(_argv(tmp_path, run_port, mock_port), cwd=ROOT, env=_env(fake),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (_listening(run_port) and _listening(mock_port)):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "make run did not start"
            time.sleep(0.1)
        key = (tmp_path / "local/demo.key").read_text().strip()
        req = urllib.request.Request(
            f"http://127.0.0.1:{run_port}/v1/chat/completions",
            data=b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
        # make's child is the gateway itself (exec), not a shell that would keep a signal.
        [child] = _children(proc.pid)
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in cmdline, cmdline
        os.kill(child, signal.SIGTERM)
        proc.wait(30)
        assert "draining" in log.read_text()  # the gateway got the signal and drained
        deadline = time.monotonic() + 30
        while _listening(mock_port):  # the mock dies with the gateway (PDEATHSIG)
            assert time.monotonic() < deadline, "the mock outlived the gateway"
            time.sleep(0.1)
        assert not _listening(run_port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
