"""config.toml: parsed once into a frozen tree; every problem named by its key path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import config

MINIMAL = """
[[upstreams]]
name = "a"
base_url = "http://127.0.0.1:9/v1/"
"""
SHIPPED = Path(__file__).parent.parent / "config.toml"


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, env=env or {})
    return info.value.problems


def test_minimal_config_gets_the_contract_defaults() -> None:
    cfg = config.parse(MINIMAL, env={})
    assert cfg.server.port == 8080
    assert cfg.sse.heartbeat_interval == 15.0
    assert cfg.auth.mode == "keys"
    assert str(cfg.upstreams[0].base_url) == "http://127.0.0.1:9/v1"
    assert cfg.upstreams[0].max_connections == 1000


def test_config_tree_is_frozen() -> None:
    cfg = config.parse(MINIMAL, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]


def test_shipped_config_is_valid_with_an_empty_environment() -> None:
    cfg = config.load(SHIPPED, env={})
    assert cfg.upstreams[0].base_url.host == "api.openai.com"
    assert cfg.auth.mode == "keys"  # auth stays on in the shipped config


def test_env_default_and_required_variables() -> None:
    text = MINIMAL.replace('"a"', '"${NAME:-fallback}"') + 'api_key = "${KEY}"\n'
    cfg = config.parse(text, env={"KEY": "sk-x"})
    assert cfg.upstreams[0].name == "fallback"
    assert cfg.upstreams[0].api_key == "sk-x"
    assert problems(text) == ["upstreams[0].api_key: environment variable KEY is not set"]


def test_numbers_from_the_environment_are_numbers() -> None:
    cfg = config.parse('[server]\nport = "${PORT:-8181}"\n' + MINIMAL, env={})
    assert cfg.server.port == 8181


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("[server]\nprot = 1", "server.prot: unknown key"),
        ("[nope]\nx = 1", "nope: unknown key"),
        ('[server]\nport = "x"', "server.port: must be an integer"),
        ("[server]\nport = 70000", "server.port: must be a port number from 0 to 65535"),
        ("[sse]\nheartbeat_interval = -1", "sse.heartbeat_interval: must be a positive number"),
        ('[auth]\nmode = "magic"', "auth.mode: must be one of"),
        (
            '[server]\ntrusted_proxies = ["nope"]',
            "server.trusted_proxies: 'nope' is not an IP network",
        ),
        (
            '[[auth.keys]]\nclient = "c"\nsha256 = "abc"',
            "auth.keys[0].sha256: must be the 64 hex digits",
        ),
        ('[[auth.keys]]\nsha256 = ""', "auth.keys[0].client: is required"),
        ('[cors]\nallow_origins = ["*"]\nallow_credentials = true', "cors.allow_origins:"),
        ("[server]\nworkers = 2", "server.workers: workers > 1 needs"),
    ],
)
def test_problems_name_the_key_path(snippet: str, expected: str) -> None:
    found = problems(snippet + "\n" + MINIMAL)
    assert any(p.startswith(expected) for p in found), found


def test_bad_upstream_url_and_negative_timeout_in_a_list() -> None:
    text = MINIMAL + '[[upstreams]]\nname = "b"\nbase_url = "ftp://x"\nidle_timeout = -3\n'
    found = problems(text)
    assert "upstreams[1].base_url: 'ftp://x' is not an http(s) URL" in found
    assert "upstreams[1].idle_timeout: must be a positive number" in found


def test_no_upstream_is_an_error() -> None:
    assert problems("") == ["upstreams: at least one [[upstreams]] is required"]


def test_literal_upstream_key_is_accepted_with_a_warning() -> None:
    cfg = config.parse(MINIMAL + 'api_key = "sk-literal"\n', env={})
    assert cfg.upstreams[0].api_key == "sk-literal"
    assert any(w.startswith("upstreams[0].api_key:") for w in cfg.warnings)
    assert not any("sk-literal" in w for w in cfg.warnings)


def test_toml_syntax_error_is_a_problem_not_a_traceback() -> None:
    assert problems("[server")[0].startswith("(toml):")


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["port", "host", "workers", "max_body_bytes", "shutdown_grace", "bogus"]),
        st.one_of(
            st.integers(-5, 70000), st.text(max_size=5), st.booleans(), st.floats(allow_nan=True)
        ),
    )
)
def test_any_server_table_parses_or_fails_with_named_problems(table: dict[str, object]) -> None:
    """Whatever a user writes, the loader answers a Config or ConfigError, never a crash."""
    lines = ["[server]"]
    for k, v in table.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, str):
            lines.append(f"{k} = {v!r}".replace("\\", "\\\\") if "'" not in v else f'{k} = "x"')
        elif isinstance(v, float) and v != v:
            lines.append(f"{k} = nan")
        else:
            lines.append(f"{k} = {v}")
    try:
        config.parse("\n".join(lines) + MINIMAL, env={})
    except config.ConfigError as exc:
        assert exc.problems
        assert all(p.startswith(("server.", "(toml)")) for p in exc.problems), exc.problems
