"""config.toml: parsed once into a frozen tree; every problem named by its key path."""

from __future__ import annotations

import dataclasses
import json
import math
import re
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


# Hostile input for the loader: whatever the file or the environment holds, the answer is a
# Config or a ConfigError whose every problem names where it is; never another exception.

_SEGMENT = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*")(?:\[\d+\])?'
_PROBLEM = re.compile(rf"^(?:\(toml\)|\(top\)|{_SEGMENT}(?:\.{_SEGMENT})*): [^\n]+$")


def _parse_or_problems(text: str, env: dict[str, str] | None = None) -> config.Config | list[str]:
    try:
        return config.parse(text, env=env or {})
    except config.ConfigError as exc:
        assert exc.problems
        for p in exc.problems:
            assert _PROBLEM.match(p), p
        return exc.problems


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_is_a_config_or_named_problems(text: str) -> None:
    _parse_or_problems(text)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are TOML's too
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


_SCHEMA = {
    name: [f.name for f in dataclasses.fields(cls)]
    for name, cls in [
        ("server", config.ServerConfig), ("sse", config.SSEConfig), ("limits", config.LimitsConfig),
        ("cors", config.CORSConfig), ("retry", config.RetryConfig),
        ("breaker", config.BreakerConfig),
        ("logging", config.LoggingConfig), ("metrics", config.MetricsConfig),
    ]
}
_KEYS = [k for keys in _SCHEMA.values() for k in keys]
_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans(), st.text(max_size=12),
    st.lists(st.text(max_size=8), max_size=3), st.lists(st.integers(), max_size=2),
    st.sampled_from(["${X}", "${X:-1}", "${NOPE}", "${X:-}", "10.0.0.0/8", "*", "redis://h:1/0"]),
)


@settings(max_examples=400, deadline=None)
@given(
    tables=st.dictionaries(
        st.sampled_from(sorted(_SCHEMA)),
        st.dictionaries(st.text(max_size=6) | st.sampled_from(_KEYS), _values, max_size=4),
        max_size=4,
    ),
    env=st.dictionaries(st.sampled_from(["X", "Y"]), st.text(max_size=8), max_size=2),
)
def test_any_table_of_any_section_parses_or_names_its_problems(
    tables: dict[str, dict[str, object]], env: dict[str, str]
) -> None:
    lines: list[str] = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        lines.extend(
            f"{json.dumps(k, ensure_ascii=False)} = {_toml_value(v)}" for k, v in values.items()
        )
    result = _parse_or_problems("\n".join(lines) + "\n" + MINIMAL, env)
    if isinstance(result, list):
        known = (*_SCHEMA, "(toml)", "upstreams", "auth", '""')
        assert all(p.startswith(known) for p in result), result


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=40).filter(lambda s: "\0" not in s))
def test_an_environment_value_arrives_verbatim_whatever_it_holds(value: str) -> None:
    text = MINIMAL + 'api_key = "${KEY}"\n'
    cfg = config.parse(text, env={"KEY": value})
    assert cfg.upstreams[0].api_key == value  # never re-interpolated, never truncated


@pytest.mark.parametrize("alg", ["HS999", "none", "hs256", "RS1", ""])
def test_an_unknown_jwt_algorithm_is_a_config_error(alg: str) -> None:
    text = f'[auth]\nmode = "jwt"\n[auth.jwt]\nsecret = "s"\nalgorithms = ["HS256", "{alg}"]\n'
    found = problems(text + MINIMAL)
    assert any(p.startswith(f"auth.jwt.algorithms: unknown algorithm {alg!r}") for p in found)


def test_every_algorithm_pyjwt_verifies_is_accepted() -> None:
    algs = ["HS256", "HS384", "HS512"]
    cfg = config.parse(
        f'[auth.jwt]\nsecret = "s"\nalgorithms = {json.dumps(algs)}\n' + MINIMAL, env={}
    )
    assert cfg.auth.jwt.algorithms == tuple(algs)
    import jwt

    assert set(config.JWT_ALGORITHMS) <= set(jwt.algorithms.get_default_algorithms())


def test_an_algorithm_that_does_not_fit_the_public_key_is_a_config_error(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = tmp_path / "ec.pem"
    pem.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    head = f'[auth]\nmode = "jwt"\n[auth.jwt]\npublic_key_file = "{pem}"\n'
    found = problems(head + 'algorithms = ["ES256", "RS256"]\n' + MINIMAL)
    assert found == ["auth.jwt.algorithms: RS256 does not fit the public key file's EC key"]
    assert config.parse(head + 'algorithms = ["ES256"]\n' + MINIMAL, env={})


def test_require_exp_defaults_to_true() -> None:
    assert config.parse(MINIMAL, env={}).auth.jwt.require_exp is True


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pw@127.0.0.1:9/v1",  # aiohttp refuses URL credentials with a header:
        "http://user@127.0.0.1:9/v1",  # every request was a 500
        "https://x.example/openai?api-version=2024-02-01",  # silently dropped
        "http://127.0.0.1:9/v1#frag",  # silently dropped
    ],
)
def test_a_base_url_part_the_gateway_would_not_send_is_a_config_error(url: str) -> None:
    found = problems(f'[[upstreams]]\nname = "a"\nbase_url = "{url}"\n')
    assert any(p.startswith("upstreams[0].base_url: ") for p in found), found


def test_a_base_url_path_is_kept_as_written() -> None:
    text = '[[upstreams]]\nname = "a"\nbase_url = "http://127.0.0.1:9/a%2Fb/v1/"\n'
    assert config.parse(text, env={}).upstreams[0].base_url.raw_path == "/a%2Fb/v1"


@pytest.mark.parametrize(
    ("section", "key", "url"),
    [
        ("limits", "redis_url", "redis-tls://:UrlPass99@127.0.0.1:6379/0"),
        ("limits", "redis_url", "rediss+x://127.0.0.1:6379/0?password=UrlPass99"),
        ("upstreams", "base_url", "htps://proxyuser:UrlPass99@proxy.example/v1"),
        ("tracing", "endpoint", "htps://u:UrlPass99@collector.example/v1/traces"),
    ],
)
def test_a_refused_url_is_quoted_without_its_password(section: str, key: str, url: str) -> None:
    # The problems go to check-config's output and to a refused reload's log line.
    if section == "upstreams":
        text = '[[upstreams]]\nname = "a"\nbase_url = "${U}"\n'
    else:
        text = MINIMAL + f'[{section}]\n{key} = "${{U}}"\n'
    found = problems(text, env={"U": url})
    assert any(f"{section}" in p and key in p and "is not a" in p for p in found), found
    assert not any("UrlPass99" in p for p in found)
