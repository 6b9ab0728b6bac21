"""`gateway serve` and `gateway mock-upstream` as real processes, as `make run` starts them."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).parent.parent
KEY = "gw-serve-test-key-abcdefghijklmnopqrstuvwxyz0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert proc.poll() is None, "process exited early"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes], Path]]:
    """The shipped config.toml, served as `make run` serves it: mock upstream + gateway."""
    mock_port, gw_port = free_port(), free_port()
    env = {
        **os.environ,
        "GATEWAY_DEMO_KEY_SHA256": hashlib.sha256(KEY.encode()).hexdigest(),
        "UPSTREAM_URL": f"http://127.0.0.1:{mock_port}/v1",
    }
    env.pop("OPENAI_API_KEY", None)
    cfg = tmp_path / "config.toml"
    cfg.write_text((ROOT / "config.toml").read_text().replace("port = 8080", f"port = {gw_port}"))
    log = tmp_path / "gateway.log"
    mock = subprocess.Popen(
        [sys.executable, "-m", "gateway", "mock-upstream", "--port", str(mock_port),
         "--delay", "0.01"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    with log.open("wb") as out:
        gw = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(mock_port, mock)
        wait_listening(gw_port, gw)
        yield gw_port, gw, log
    finally:
        for p in (gw, mock):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (gw, mock):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_openai_sdk_streams_through_a_served_gateway(served) -> None:
    port, gw, log = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "Say hi"}]
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("You said: Say hi")
    client.close()

    gw.send_signal(signal.SIGTERM)
    assert gw.wait(timeout=15) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry.get("event") == "access"]
    assert access and access[-1]["outcome"] == "completed"
    assert access[-1]["completion_tokens"] > 0
    assert KEY not in log.read_text()


def test_served_gateway_refuses_a_wrong_key(served) -> None:
    port, _, _ = served
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="gw-wrong", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    client.close()


def test_tune_gc_freezes_the_startup_heap_and_spaces_young_collections() -> None:
    """What `_serve` does once listening (the bench measures what it buys)."""
    import gc

    from gateway.process.server import GC_THRESHOLD, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLD
        assert GC_THRESHOLD[0] > before[0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
