"""Who may do what, derived once from a Config: keys, JWT keys, limits, CORS headers.

Everything the auth, CORS and throttle middlewares derive from the config lives in one
frozen `Policy`, built by `build_policy(cfg)`. The middlewares hold a `PolicyHolder` and read
`holder.current` once per request, so a reload (SIGHUP) is `holder.replace(new_cfg)`: one
attribute swap, no restart, requests in flight keep the policy they started with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .config import Config, CORSConfig, JWTConfig, Network
from .identity import Identity
from .limits.gcra import Rate

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID, X-Request-ID, x-api-key"
EXPOSE_HEADERS = (
    "X-Request-ID, Retry-After, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
    "x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, "
    "x-ratelimit-reset-tokens"
)


# Keys, JWT keys, limits and CORS derived from the config; `.replace(cfg)` on reload.
POLICY: web.AppKey[PolicyHolder] = web.AppKey("policy")

@dataclass(frozen=True, slots=True)
class CORSPolicy:
    """Exact-origin allow-list; every header set it answers with is built at construction."""

    preflight: Mapping[str, Mapping[str, str]]  # origin -> headers of a 204 preflight answer
    actual: Mapping[str, Mapping[str, str]]  # origin -> headers of any other response
    wildcard: tuple[Mapping[str, str], Mapping[str, str]] | None  # for "*": same two, any origin

    def for_preflight(self, origin: str) -> Mapping[str, str] | None:
        found = self.preflight.get(origin)
        return found if found is not None or self.wildcard is None else self.wildcard[0]

    def for_actual(self, origin: str) -> Mapping[str, str] | None:
        found = self.actual.get(origin)
        return found if found is not None or self.wildcard is None else self.wildcard[1]


def build_cors(cfg: CORSConfig) -> CORSPolicy:
    def headers(allow_origin: str) -> tuple[Mapping[str, str], Mapping[str, str]]:
        common = {"Access-Control-Allow-Origin": allow_origin, "Vary": "Origin"}
        if cfg.allow_credentials:
            common["Access-Control-Allow-Credentials"] = "true"
        preflight = {
            **common,
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": str(cfg.max_age),
        }
        actual = {**common, "Access-Control-Expose-Headers": EXPOSE_HEADERS}
        return MappingProxyType(preflight), MappingProxyType(actual)

    listed = {o: headers(o) for o in cfg.allow_origins if o != "*"}
    # "*" never comes with credentials (refused at config load), so it can be answered as "*".
    return CORSPolicy(
        preflight=MappingProxyType({o: h[0] for o, h in listed.items()}),
        actual=MappingProxyType({o: h[1] for o, h in listed.items()}),
        wildcard=headers("*") if "*" in cfg.allow_origins else None,
    )


@dataclass(frozen=True, slots=True)
class JWTPolicy:
    """What verifying a token needs: a key per accepted algorithm, claims to check."""

    keys: Mapping[str, Any]  # algorithm -> secret bytes or public key object
    audience: str | None
    issuer: str | None
    client_claim: str
    defaults: Identity  # limits and models of a subject with no [[auth.keys]] entry
    require: tuple[str, ...] = ()  # claims a token must carry ("exp" unless configured off)


def build_jwt(cfg: JWTConfig) -> JWTPolicy:
    public: Any = None
    if cfg.public_key_file:
        try:
            public = load_pem_public_key(Path(cfg.public_key_file).read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"auth.jwt.public_key_file: not a PEM public key ({exc})") from None
    # One key per algorithm: an HS* token is never checked against the public key (the
    # classic algorithm-confusion hole), an RS*/ES* token never against the secret.
    keys = {
        alg: cfg.secret.encode() if alg.startswith("HS") else public
        for alg in cfg.algorithms
        if (cfg.secret if alg.startswith("HS") else public is not None)
    }
    return JWTPolicy(
        keys=MappingProxyType(keys),
        audience=cfg.audience or None,
        issuer=cfg.issuer or None,
        client_claim=cfg.client_claim,
        require=("exp",) if cfg.require_exp else (),
        defaults=Identity(
            client="",
            rpm=cfg.rpm,
            burst=cfg.burst,
            tpm=cfg.tpm,
            max_concurrent=cfg.max_concurrent,
            models=cfg.models,
        ),
    )


@dataclass(frozen=True, slots=True)
class Policy:
    mode: str  # "keys" | "jwt" | "keys+jwt" | "none"
    by_hash: Mapping[str, tuple[str, Identity]]  # sha256 hex of a key -> (that hex, client)
    by_client: Mapping[str, Identity]  # client name -> identity (for JWT subjects)
    jwt: JWTPolicy | None
    per_ip: Rate | None  # None: unlimited
    trusted_proxies: tuple[Network, ...]
    cors: CORSPolicy
    lease_ttl: float  # a concurrency lease outlives any request or generation holding it


def build_policy(cfg: Config) -> Policy:
    """Derive everything auth, CORS and throttling need from a validated config."""
    by_hash: dict[str, tuple[str, Identity]] = {}
    by_client: dict[str, Identity] = {}
    for k in cfg.auth.keys:
        ident = Identity(
            client=k.client,
            rpm=k.rpm,
            burst=k.burst,
            tpm=k.tpm,
            max_concurrent=k.max_concurrent,
            models=k.models,
        )
        by_client[k.client] = ident
        if k.sha256:
            by_hash[k.sha256] = (k.sha256, ident)
    longest = max((u.total_timeout for u in cfg.upstreams), default=900.0)
    return Policy(
        mode=cfg.auth.mode,
        by_hash=MappingProxyType(by_hash),
        by_client=MappingProxyType(by_client),
        jwt=build_jwt(cfg.auth.jwt) if "jwt" in cfg.auth.mode else None,
        per_ip=Rate(cfg.limits.per_ip_rpm) if cfg.limits.per_ip_rpm else None,
        trusted_proxies=cfg.server.trusted_proxies,
        cors=build_cors(cfg.cors),
        lease_ttl=longest * cfg.retry.attempts + cfg.server.shutdown_grace + 60.0,
    )


class PolicyHolder:
    """The current Policy; a reload (SIGHUP) swaps in one built from the new config.

    `prepare_reload(cfg)` builds the new policy (raising ValueError if it cannot) and returns
    the commit that swaps it in, the two-phase shape of `app[RELOADERS].add(...)`;
    `replace(cfg)` does both at once.
    """

    __slots__ = ("current",)

    def __init__(self, cfg: Config) -> None:
        self.current = build_policy(cfg)

    def prepare_reload(self, cfg: Config) -> Callable[[], None]:
        new = build_policy(cfg)

        def commit() -> None:
            self.current = new

        return commit

    def replace(self, cfg: Config) -> None:
        self.prepare_reload(cfg)()
