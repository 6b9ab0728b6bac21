"""The console script: serve, check-config, keygen, mock-upstream."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
    )


def test_check_config_accepts_the_shipped_config() -> None:
    done = run("check-config", "--config", "config.toml", env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "config.toml: ok" in done.stdout


def test_check_config_prints_path_key_message_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nprot = 1\n[[upstreams]]\nname = "a"\nbase_url = "nope"\n')
    done = run("check-config", "--config", str(bad))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert f"{bad}: server.prot: unknown key" in lines
    assert f"{bad}: upstreams[0].base_url: 'nope' is not an http(s) URL" in lines


def test_serve_refuses_a_bad_config_before_binding(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = -1\n")
    done = run("serve", "--config", str(bad))
    assert done.returncode == 2
    assert "server.port" in done.stderr


def test_keygen_prints_a_key_and_a_block_with_only_its_hash() -> None:
    done = run("keygen", "--client", "alice")
    assert done.returncode == 0
    key = done.stdout.splitlines()[0]
    assert re.fullmatch(r"gw-[A-Za-z0-9_-]{32,}", key)
    block = done.stdout.split("\n", 1)[1]
    assert key not in block
    parsed = tomllib.loads(block)["auth"]["keys"][0]
    assert parsed["client"] == "alice"
    assert parsed["sha256"] == hashlib.sha256(key.encode()).hexdigest()


def test_keygen_makes_a_new_key_each_time() -> None:
    assert run("keygen", "--client", "a").stdout != run("keygen", "--client", "a").stdout


def test_help_lists_the_commands() -> None:
    done = run("--help")
    for cmd in ("serve", "check-config", "keygen", "mock-upstream"):
        assert cmd in done.stdout


def _pasted(block: str) -> str:
    """The client name the gateway reads once the block is pasted into the shipped config."""
    from gateway import config

    shipped = (ROOT / "config.toml").read_text()
    cfg = config.parse(shipped + "\n" + block, env={})
    return cfg.auth.keys[-1].client


def test_keygen_escapes_quotes_and_backslashes_in_the_client_name() -> None:
    for name in ('team "a"', "dom\\user", 'a\\"b', "é ü 名前"):
        done = run("keygen", "--client", name)
        assert done.returncode == 0, (name, done.stderr)
        block = done.stdout.split("\n", 1)[1]
        assert tomllib.loads(block)["auth"]["keys"][0]["client"] == name
        assert _pasted(block) == name


def test_keygen_refuses_a_client_name_the_config_cannot_hold() -> None:
    # A newline or another control character cannot be in a one-line TOML string as typed;
    # `${` would be read as an environment variable when the config loads.
    for name in ("two\nlines", "tab\there", "bell\x07", "${HOME}", "", "  "):
        done = run("keygen", "--client", name)
        assert done.returncode == 2, name
        assert done.stdout == ""  # no key made, nothing to paste
        assert "client name" in done.stderr
