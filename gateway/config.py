"""config.toml, parsed once into a tree of frozen, slotted dataclasses.

The dataclasses below *are* the schema: `_build` walks their fields, so a key that is not a
field is an error (a typo must not be silently ignored), a value of the wrong type is an
error, and each field's `check` turns the raw value into its final form (networks parsed,
URLs normalised) or says what is wrong. Every problem is collected with its key path
(`upstreams[0].api_key: ...`) so that one run of `gateway check-config` shows all of them.

Strings may use `${VAR}` (missing is an error) and `${VAR:-default}`.
"""

from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import json
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A config that cannot be served; `problems` are `key.path: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------- checks
# A check takes the (type-checked) raw value and returns the stored value, or raises
# ValueError with a message for the user.

Check = Callable[[Any], Any]


def _positive(v: float) -> float:
    if not v > 0 or math.isinf(v):
        raise ValueError("must be a positive number")
    return v


def _non_negative(v: float) -> float:
    if v < 0 or math.isinf(v):
        raise ValueError("must be zero or positive")
    return v


def _port(v: int) -> int:
    if not 0 <= v <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return v


def _at_least(n: int) -> Check:
    def check(v: int) -> int:
        if v < n:
            raise ValueError(f"must be at least {n}")
        return v

    return check


def _one_of(*choices: str) -> Check:
    def check(v: str) -> str:
        if v not in choices:
            raise ValueError("must be one of " + ", ".join(repr(c) for c in choices))
        return v

    return check


def _networks(v: list[str]) -> tuple[Network, ...]:
    out = []
    for item in v:
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network (e.g. 10.0.0.0/8)") from None
    return tuple(out)


def _http_url(v: str) -> URL:
    url = URL(v)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{redacted_url(v)!r} is not an http(s) URL")
    # Nothing the upstream would not get: aiohttp refuses credentials in a URL beside the
    # Authorization header (every request was a 500), and the path is rebuilt per request,
    # which dropped a query or fragment without a word. Not echoed: it may hold a password.
    if url.raw_user is not None or url.raw_password is not None:
        raise ValueError("must not hold credentials (user:password@); use api_key")
    if url.raw_query_string or url.raw_fragment or "?" in v or "#" in v:
        raise ValueError("must not have a query or fragment: the gateway sends none upstream")
    # The path as written (a %2F stays encoded): requests append to its raw form.
    return url.with_path(url.raw_path.rstrip("/"), encoded=True)


def redacted_url(v: str) -> str:
    """`v` without its password (in the userinfo, or redis-py's `password` query argument):
    the form a message or a log line may show."""
    try:
        u = URL(v)
        if u.password:
            u = u.with_password("***")
        if "password" in u.query:
            u = u.update_query(password="***")
        return str(u)
    except ValueError:  # not even a URL: nothing of it is shown
        return "the URL"


def _redis_url(v: str) -> str:
    if URL(v).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{redacted_url(v)!r} is not a redis:// URL")
    return v


def _host_ports(v: list[str]) -> tuple[tuple[str, int], ...]:
    out = []
    for item in v:
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"{item!r} is not host:port")
        out.append((host, int(port)))
    return tuple(out)


def _file_or_empty(v: str) -> str:
    if v and not Path(v).is_file():
        raise ValueError(f"{v!r} is not a file")
    return v


def _sha256(v: str) -> str:
    # Empty disables the entry (the shipped config's demo key before `make run` made one).
    if v and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
        raise ValueError("must be the 64 hex digits of the key's SHA-256")
    return v.lower()


def _patterns(v: list[str]) -> tuple[str, ...]:
    return tuple(v)


# Never passed on, whatever `pass_headers` says: credentials, and what the gateway sets itself.
NEVER_PASSED = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-api-key",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)


def _header_patterns(v: list[str]) -> tuple[str, ...]:
    out = []
    for item in v:
        low = item.strip().lower()
        if not re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", low):
            raise ValueError(f"{item!r} is not a header name pattern")
        if low in NEVER_PASSED or low == "*":
            raise ValueError(f"{item!r} may not be passed upstream")
        out.append(low)
    return tuple(out)


def _http_path(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError("must start with /")
    return v


# The JWT algorithms PyJWT verifies, by the kind of key each needs ("none" is never one).
JWT_ALGORITHMS: Mapping[str, str] = {
    **{f"HS{n}": "secret" for n in (256, 384, 512)},
    **{f"RS{n}": "rsa" for n in (256, 384, 512)},
    **{f"PS{n}": "rsa" for n in (256, 384, 512)},
    **{f"ES{n}": "ec" for n in (256, 384, 512)},
    "EdDSA": "okp",
}


def _jwt_algorithms(v: list[str]) -> tuple[str, ...]:
    unknown = [a for a in v if a not in JWT_ALGORITHMS]
    if unknown:
        raise ValueError(
            f"unknown algorithm {unknown[0]!r} (one of " + ", ".join(JWT_ALGORITHMS) + ")"
        )
    if not v:
        raise ValueError("must name at least one algorithm")
    return tuple(v)


def _otlp_url(v: str) -> str:
    # "" turns tracing off; otherwise the full OTLP/HTTP traces URL (path included).
    if v and (URL(v).scheme not in ("http", "https") or not URL(v).host):
        raise ValueError(
            f"{redacted_url(v)!r} is not an http(s) URL (e.g. http://127.0.0.1:4318/v1/traces)"
        )
    return v


# A header name: an RFC 9110 token's characters (the CORS middleware checks names with it too).
TOKEN_CHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_HEADER_NAME = re.compile(TOKEN_CHARS + "+")


# What frames the exporter's POST: a collector's header table may not say it (Content-Type
# it may: the exporter's own wins).
_FRAMING_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "content-encoding", "host", "connection"}
)
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


def _header_table(v: dict[str, str]) -> tuple[tuple[str, str], ...]:
    for name, value in v.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a header name")
        if name.lower() in _FRAMING_HEADERS:
            raise ValueError(f"{name!r} is the exporter's to send")
        if "\r" in value or "\n" in value:
            raise ValueError(f"the value of {name!r} holds a line break")
        if not _HEADER_VALUE.fullmatch(value):
            raise ValueError(f"the value of {name!r} is not printable ASCII")
    return tuple(v.items())


def _ratio(v: float) -> float:
    if not 0.0 <= v <= 1.0:
        raise ValueError("must be from 0.0 to 1.0")
    return v


def _check(fn: Check, default: Any = dataclasses.MISSING) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: fn(list(default)), metadata={"check": fn})
    if isinstance(default, dict):
        return field(default_factory=lambda: fn(dict(default)), metadata={"check": fn})
    return field(default=default, metadata={"check": fn})


# ---------------------------------------------------------------------------- schema


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = _check(_port, 8080)
    workers: int = _check(_at_least(1), 1)
    trusted_proxies: tuple[Network, ...] = _check(_networks, ["127.0.0.1/32", "::1/128"])
    max_body_bytes: int = _check(_at_least(1), 1048576)
    shutdown_grace: float = _check(_non_negative, 30.0)
    # A connection is closed when a request's headers have not all arrived this many seconds
    # after it opened (or after its previous response): slowloris. Also the idle keep-alive.
    keepalive_timeout: float = _check(_positive, 75.0)
    # Longest wait for a request body to arrive in full (a body that never finishes): 408.
    body_timeout: float = _check(_positive, 60.0)


@dataclass(frozen=True, slots=True)
class SSEConfig:
    heartbeat_interval: float = _check(_positive, 15.0)
    retry_ms: int = _check(_at_least(0), 3000)
    resume_ttl: float = _check(_non_negative, 600.0)
    max_connection_age: float = _check(_non_negative, 0.0)
    max_event_bytes: int = _check(_at_least(1024), 1 << 20)
    # A client that stops reading: dropped once a write has waited this long for the socket
    # to drain (checked once a tick of `ticker.Ticker`: within write_timeout and one tick).
    write_timeout: float = _check(_positive, 30.0)
    max_log_events: int = _check(_at_least(1), 100_000)
    max_log_bytes: int = _check(_at_least(1024), 16 << 20)
    # All ended detached streams kept for resuming, together (oldest dropped first).
    max_retained_bytes: int = _check(_at_least(1024), 256 << 20)
    # GET /v1/streams/{id} readers open at once on this instance (each holds a socket, and with
    # Redis a blocking Redis connection); more are refused 503 too_many_followers.
    max_followers: int = _check(_at_least(1), 1000)


@dataclass(frozen=True, slots=True)
class KeyConfig:
    client: str
    sha256: str = _check(_sha256)
    rpm: int = _check(_at_least(0), 600)
    burst: int = _check(_at_least(0), 0)
    tpm: int = _check(_at_least(0), 0)
    max_concurrent: int = _check(_at_least(0), 8)
    models: tuple[str, ...] = _check(_patterns, ["*"])


@dataclass(frozen=True, slots=True)
class JWTConfig:
    algorithms: tuple[str, ...] = _check(_jwt_algorithms, ["HS256"])
    secret: str = ""
    public_key_file: str = ""
    audience: str = ""
    issuer: str = ""
    client_claim: str = "sub"
    # A token without "exp" would be good forever: refused (401) unless this is false.
    require_exp: bool = True
    rpm: int = _check(_at_least(0), 60)
    burst: int = _check(_at_least(0), 0)
    tpm: int = _check(_at_least(0), 0)
    max_concurrent: int = _check(_at_least(0), 4)
    models: tuple[str, ...] = _check(_patterns, ["*"])


@dataclass(frozen=True, slots=True)
class AuthConfig:
    mode: str = _check(_one_of("keys", "jwt", "keys+jwt", "none"), "keys")
    keys: tuple[KeyConfig, ...] = ()
    jwt: JWTConfig = field(default_factory=JWTConfig)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    backend: str = _check(_one_of("memory", "redis"), "memory")
    redis_url: str = _check(_redis_url, "redis://127.0.0.1:6379/0")
    # "sentinel": redis_url gives the credentials, db and TLS; the master is asked of the
    # sentinels. "cluster": redis_url names any one node; the others are discovered.
    redis_mode: str = _check(_one_of("standalone", "sentinel", "cluster"), "standalone")
    sentinels: tuple[tuple[str, int], ...] = _check(_host_ports, [])
    sentinel_master: str = "mymaster"
    tls_ca_file: str = _check(_file_or_empty, "")
    tls_cert_file: str = _check(_file_or_empty, "")
    tls_key_file: str = _check(_file_or_empty, "")
    per_ip_rpm: int = _check(_at_least(0), 1200)
    on_redis_error: str = _check(_one_of("open", "closed"), "open")
    # Redis backend: an instance renews its concurrency slots and detached streams' ownership
    # every lease_ttl / 3 seconds; a crashed instance's are freed lease_ttl seconds later.
    lease_ttl: float = _check(_positive, 15.0)


@dataclass(frozen=True, slots=True)
class CORSConfig:
    allow_origins: tuple[str, ...] = _check(_patterns, [])
    allow_credentials: bool = False
    max_age: int = _check(_at_least(0), 600)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    base_url: URL = _check(_http_url)
    api_key: str = ""
    models: tuple[str, ...] = _check(_patterns, ["*"])
    priority: int = 0
    weight: int = _check(_at_least(1), 1)
    max_connections: int = _check(_at_least(1), 1000)
    connect_timeout: float = _check(_positive, 5.0)
    first_byte_timeout: float = _check(_positive, 60.0)
    idle_timeout: float = _check(_positive, 120.0)
    total_timeout: float = _check(_positive, 900.0)
    # OpenAI-Organization and OpenAI-Project name the account the upstream bills: passed on
    # from the client only when this upstream is meant to take them.
    forward_openai_headers: bool = False
    # More client request headers passed on to this upstream (fnmatch patterns, any case),
    # beyond the fixed allow-list (gateway.upstream.pool.FORWARDED).
    pass_headers: tuple[str, ...] = _check(_header_patterns, [])


@dataclass(frozen=True, slots=True)
class RetryConfig:
    attempts: int = _check(_at_least(1), 3)
    backoff_initial: float = _check(_non_negative, 0.25)
    backoff_max: float = _check(_non_negative, 8.0)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = _check(_at_least(1), 5)
    cooldown: float = _check(_positive, 30.0)


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = _check(_one_of("debug", "info", "warning", "error"), "info")
    format: str = _check(_one_of("json", "console"), "json")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    path: str = _check(_http_path, "/metrics")
    allow: tuple[Network, ...] = _check(_networks, ["127.0.0.1/32", "::1/128"])


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry traces over OTLP/HTTP; off while `endpoint` is empty."""

    endpoint: str = _check(_otlp_url, "")
    # Extra headers for the collector (its auth): a table of strings.
    headers: tuple[tuple[str, str], ...] = _check(_header_table, {})
    service_name: str = "gateway"
    # Of root traces; a sampled incoming traceparent is always followed.
    sample_ratio: float = _check(_ratio, 1.0)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    sse: SSEConfig = field(default_factory=SSEConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cors: CORSConfig = field(default_factory=CORSConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    # Not from the file: where it came from and what the loader warned about.
    source: str = field(default="", metadata={"internal": True})
    warnings: tuple[str, ...] = field(default=(), metadata={"internal": True})
    # `gateway serve --port N` (a systemd template's instance name): kept across reloads.
    port_override: int | None = field(default=None, metadata={"internal": True})


# ---------------------------------------------------------------------------- loading

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Loader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.literal: set[str] = set()  # paths of strings written without ${...}

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def interpolate(self, raw: Any, path: str) -> Any:
        if isinstance(raw, dict):
            return {k: self.interpolate(v, _join(path, k)) for k, v in raw.items()}
        if isinstance(raw, list):
            return [self.interpolate(v, f"{path}[{i}]") for i, v in enumerate(raw)]
        if not isinstance(raw, str):
            return raw
        if "${" not in raw:
            self.literal.add(path)
            return raw

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            self.problem(path, f"environment variable {name} is not set")
            return ""

        return _VAR.sub(sub, raw)

    def build(self, cls: type[Any], raw: Any, path: str) -> Any:
        if not isinstance(raw, dict):
            self.problem(path or "(top)", "must be a table")
            return None
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        for key in raw:
            if key not in known:
                self.problem(_join(path, key), "unknown key")
        kwargs: dict[str, Any] = {}
        for name, f in known.items():
            fpath = _join(path, name)
            if name not in raw:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    self.problem(fpath, "is required")
                continue
            value = self.value(hints[name], raw[name], fpath, f.metadata.get("check"))
            if value is not _BAD:
                kwargs[name] = value
        try:
            return cls(**kwargs)
        except TypeError:  # a required field already reported
            return None

    def value(self, hint: Any, raw: Any, path: str, check: Check | None) -> Any:
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            built = self.build(typing.cast(type[Any], hint), raw, path)
            return _BAD if built is None else built
        if origin is tuple and check is None:  # a list of tables: [[upstreams]], [[auth.keys]]
            item_cls = typing.get_args(hint)[0]
            if not isinstance(raw, list):
                self.problem(path, "must be a list of tables")
                return _BAD
            items = [self.build(item_cls, v, f"{path}[{i}]") for i, v in enumerate(raw)]
            return tuple(i for i in items if i is not None)
        expected = _raw_type(hint, check)
        raw = _coerce(raw, expected)
        if not _is_instance(raw, expected):
            self.problem(path, f"must be {_describe(expected)}")
            return _BAD
        if check is None:
            return raw
        try:
            return check(raw)
        except ValueError as exc:
            self.problem(path, str(exc))
            return _BAD


_BAD = object()


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(path: str, key: str) -> str:
    # A key that is not a TOML bare key is shown quoted, as TOML writes it: a key holding a
    # newline or ": " must not forge a line of `check-config` output.
    if not _BARE_KEY.fullmatch(key):
        key = json.dumps(key)
    return f"{path}.{key}" if path else key


def _raw_type(hint: Any, check: Check | None) -> Any:
    """What the TOML value must be before its check converts it."""
    if hint in (str, int, float, bool):
        return hint
    if check in (_http_url, _otlp_url):
        return str
    if check is _header_table:
        return dict
    return list  # tuples of networks / patterns come in as lists of strings


def _coerce(raw: Any, expected: Any) -> Any:
    # Values from ${VAR} arrive as strings; a number field accepts a numeric string.
    if isinstance(raw, str) and expected in (int, float):
        try:
            return expected(raw)
        except ValueError:
            return raw
    if expected is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    return raw


def _is_instance(raw: Any, expected: Any) -> bool:
    if expected is list:
        return isinstance(raw, list) and all(isinstance(v, str) for v in raw)
    if expected is dict:
        return isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values())
    if expected in (int, float) and isinstance(raw, bool):
        return False
    return isinstance(raw, expected)


def _describe(expected: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list of strings",
        dict: "a table of strings",
    }.get(expected, str(expected))


def _cross_checks(cfg: Config, ld: _Loader) -> None:
    """Rules that span several keys."""
    if not cfg.upstreams:
        ld.problem("upstreams", "at least one [[upstreams]] is required")
    names = [u.name for u in cfg.upstreams]
    for i, name in enumerate(names):
        if names.index(name) != i:
            ld.problem(f"upstreams[{i}].name", f"duplicate upstream name {name!r}")
    clients = [k.client for k in cfg.auth.keys]
    for i, k in enumerate(cfg.auth.keys):
        if clients.index(k.client) != i:
            ld.problem(f"auth.keys[{i}].client", f"duplicate client {k.client!r}")
        if not k.sha256:
            ld.warnings.append(f"auth.keys[{i}].sha256: empty, client {k.client!r} cannot sign in")
    if cfg.cors.allow_credentials and "*" in cfg.cors.allow_origins:
        ld.problem("cors.allow_origins", '"*" is not allowed with allow_credentials = true')
    if cfg.retry.backoff_max < cfg.retry.backoff_initial:
        ld.problem("retry.backoff_max", "must not be less than retry.backoff_initial")
    if cfg.server.workers > 1 and cfg.limits.backend == "memory":
        ld.problem(
            "server.workers",
            'workers > 1 needs limits.backend = "redis" (the memory backend is per process)',
        )
    _redis_checks(cfg.limits, ld)
    jwt = cfg.auth.jwt
    if "jwt" in cfg.auth.mode:
        hs = any(a.startswith("HS") for a in jwt.algorithms)
        if hs and not jwt.secret:
            ld.problem("auth.jwt.secret", "is required for HS* algorithms")
        if not hs and not jwt.public_key_file:
            ld.problem("auth.jwt.public_key_file", "is required for RS*/PS*/ES*/EdDSA algorithms")
        if jwt.public_key_file and not Path(jwt.public_key_file).is_file():
            ld.problem("auth.jwt.public_key_file", f"{jwt.public_key_file!r} is not a file")
        elif jwt.public_key_file:
            kind = _pem_public_key_kind(Path(jwt.public_key_file))
            if kind is None:
                ld.problem("auth.jwt.public_key_file", "is not a PEM public key")
            else:
                for alg in jwt.algorithms:
                    if JWT_ALGORITHMS[alg] not in ("secret", kind):
                        ld.problem(
                            "auth.jwt.algorithms",
                            f"{alg} does not fit the public key file's {kind.upper()} key",
                        )
        if hs and jwt.secret and len(jwt.secret.encode()) < 32:
            ld.warnings.append("auth.jwt.secret: shorter than 32 bytes (RFC 7518 3.2 asks for 32)")
    for i in range(len(cfg.upstreams)):
        if f"upstreams[{i}].api_key" in ld.literal and cfg.upstreams[i].api_key:
            ld.warnings.append(
                f"upstreams[{i}].api_key: a literal key in the file; "
                "prefer ${VAR} from the environment"
            )
    if cfg.tracing.endpoint and (missing := otel_missing()):
        ld.problem(
            "tracing.endpoint",
            f"tracing needs the OpenTelemetry SDK ({missing} is not installed): "
            "pip install 'gateway[otel]'",
        )
    if "auth.jwt.secret" in ld.literal and jwt.secret:
        ld.warnings.append(
            "auth.jwt.secret: a literal secret in the file; prefer ${VAR} from the environment"
        )


def _redis_checks(lim: LimitsConfig, ld: _Loader) -> None:
    url = URL(lim.redis_url)
    if lim.redis_mode == "sentinel":
        if not lim.sentinels:
            ld.problem("limits.sentinels", 'redis_mode = "sentinel" needs at least one host:port')
        if not lim.sentinel_master:
            ld.problem("limits.sentinel_master", "must not be empty in sentinel mode")
    elif lim.sentinels:
        ld.problem("limits.sentinels", 'only used with redis_mode = "sentinel"')
    if lim.redis_mode != "standalone" and url.scheme == "unix":
        ld.problem("limits.redis_url", f"a unix socket cannot be used in {lim.redis_mode} mode")
    if lim.redis_mode == "cluster" and url.path not in ("", "/", "/0"):
        ld.problem("limits.redis_url", "a cluster has only database 0")
    tls = ("tls_ca_file", "tls_cert_file", "tls_key_file")
    if url.scheme != "rediss":
        for name in tls:
            if getattr(lim, name):
                ld.problem(f"limits.{name}", "is only used with a rediss:// URL")
    if bool(lim.tls_cert_file) != bool(lim.tls_key_file):
        missing = "tls_key_file" if lim.tls_cert_file else "tls_cert_file"
        ld.problem(f"limits.{missing}", "tls_cert_file and tls_key_file go together")


def otel_missing() -> str | None:
    """The first module of the `otel` extra that cannot be imported, else None."""
    for module in ("opentelemetry.sdk.trace", "opentelemetry.proto.trace.v1.trace_pb2", "urllib3"):
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


def _pem_public_key_kind(path: Path) -> str | None:
    """"rsa", "ec" or "okp" (Ed25519/Ed448) for a PEM public key file, else None."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError):
        return None
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "okp"
    return None


def parse(text: str, *, source: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    """Parse config text; raise ConfigError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"(toml): {exc}"]) from None
    ld = _Loader(os.environ if env is None else env)
    raw = ld.interpolate(raw, "")
    cfg = ld.build(Config, raw, "")
    if cfg is not None and not ld.problems:
        _cross_checks(cfg, ld)
    if ld.problems or cfg is None:
        raise ConfigError(ld.problems)
    built: Config = dataclasses.replace(cfg, source=source, warnings=tuple(ld.warnings))
    return built


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and parse the config file at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"(file): cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(["(file): not UTF-8 text"]) from None
    return parse(text, source=str(path), env=env)


def with_port(cfg: Config, port: int | None) -> Config:
    """`cfg` listening on `port` instead of `[server].port` (None: unchanged)."""
    if port is None:
        return cfg
    _port(port)
    server = dataclasses.replace(cfg.server, port=port)
    return dataclasses.replace(cfg, server=server, port_override=port)


def default_path() -> str:
    """`--config` default: $GATEWAY_CONFIG, then ./config.toml."""
    return os.environ.get("GATEWAY_CONFIG") or "config.toml"


# Re-exported for type annotations elsewhere.
__all__ = [
    "AuthConfig",
    "BreakerConfig",
    "CORSConfig",
    "Config",
    "ConfigError",
    "JWTConfig",
    "KeyConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "Network",
    "RetryConfig",
    "SSEConfig",
    "ServerConfig",
    "TracingConfig",
    "UpstreamConfig",
    "default_path",
    "load",
    "parse",
    "with_port",
]
