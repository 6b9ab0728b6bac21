"""Prometheus metrics: one registry per app, fed once per request and once per stream.

Every label value is bounded: routes are the router's canonical paths (or "unmatched"),
clients are configured names, "anonymous", or "jwt" for any JWT subject not in the config,
upstreams come from the config and outcomes from a fixed set. Children known at start are
bound then; nothing here runs per chunk (the relay moves `active_streams` once per stream).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from aiohttp import hdrs, web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.exposition import generate_latest

from .config import Config
from .errors import Forbidden
from .exchange import Exchange
from .state import IDENTITY
from .usage.tap import Usage

__all__ = ["ATTEMPT_OUTCOMES", "METRICS", "Metrics", "metrics_handler"]

METRICS: web.AppKey[Metrics] = web.AppKey("metrics")

ATTEMPT_OUTCOMES = ("ok", "connect_error", "timeout", "throttled", "server_error")
TOKEN_KINDS = ("prompt", "completion")
# Time to first byte and whole requests: from a cached answer to a long generation.
_TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    900.0,
)


class Metrics:
    """The gateway's collectors, registered in a registry of this app's own."""

    def __init__(self, cfg: Config) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Arrival to the end of the response.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "gateway_ttfb_seconds",
            "Arrival to the first body byte written.",
            buckets=_TTFB_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge(
            "gateway_active_streams", "SSE streams being relayed now.", registry=r
        )
        self.upstream_attempts = Counter(
            "gateway_upstream_attempts",
            "Tries at an upstream, by upstream and outcome.",
            ["upstream", "outcome"],
            registry=r,
        )
        self.retries = Counter("gateway_retries", "Tries after a request's first one.", registry=r)
        self.breaker_state = Gauge(
            "gateway_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["upstream"],
            registry=r,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens used, by client and kind (prompt, completion).",
            ["client", "kind"],
            registry=r,
        )
        self.throttled = Counter(
            "gateway_throttled",
            "Requests refused with 429 by the gateway, by reason.",
            ["reason"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "gateway_client_disconnects",
            "Requests whose client left before the end.",
            registry=r,
        )
        self.trace_spans_dropped = Counter(
            "gateway_trace_spans_dropped",
            "Spans not exported: the queue to the collector was full, or it refused them.",
            registry=r,
        )
        self.allow = cfg.metrics.allow
        self._clients: frozenset[str] = frozenset()
        self._tokens: dict[tuple[str, str], Counter] = {}
        self.prepare_reload(cfg)()
        self._attempts: dict[tuple[str, str], Counter] = {}
        # requests_total children, bound on first use: routes are the router's few canonical
        # paths and statuses three digits, so this stays small; a labels() call per request
        # (lock, label checks) does not.
        self._requests: dict[tuple[str, int], Counter] = {}
        self._breakers: dict[str, Gauge] = {}

    def bind_upstreams(self, names: list[str]) -> None:
        """Bind the per-upstream children (the pool calls this once it knows its upstreams)."""
        for name in names:
            for outcome in ATTEMPT_OUTCOMES:
                self._attempts[name, outcome] = self.upstream_attempts.labels(name, outcome)
            gauge = self._breakers[name] = self.breaker_state.labels(name)
            gauge.set(0)

    def watch_redis(self, up: Callable[[], bool]) -> None:
        """With the Redis backend: `gateway_redis_up`, 1 while Redis answers (read at scrape
        time). Absent with the memory backend, so no alert fires for a Redis not in use."""
        gauge = Gauge(
            "gateway_redis_up",
            "1 while the shared Redis answers, 0 while it is unreachable.",
            registry=self.registry,
        )
        gauge.set_function(lambda: 1.0 if up() else 0.0)

    def attempt(self, upstream: str, outcome: str) -> None:
        child = self._attempts.get((upstream, outcome))
        if child is None:  # an upstream added by a reload, not bound at start
            child = self.upstream_attempts.labels(upstream, outcome)
        child.inc()

    def breaker(self, upstream: str, state: int) -> None:
        child = self._breakers.get(upstream)
        if child is None:
            child = self.breaker_state.labels(upstream)
        child.set(state)

    def prepare_reload(self, cfg: Config) -> Callable[[], None]:
        """Label the clients of `cfg` (at start, and on SIGHUP: `app[RELOADERS]`).

        Clients are only ever added: a stream that a removed client started before the
        reload still ends under its own label, and the set stays bounded by the configs seen.
        """
        clients = self._clients | {k.client for k in cfg.auth.keys} | {"anonymous"}
        tokens = dict(self._tokens)
        for c in (*clients, "jwt"):
            for k in TOKEN_KINDS:
                if (c, k) not in tokens:
                    tokens[c, k] = self.tokens.labels(c, k)

        def commit() -> None:
            self._clients, self._tokens = clients, tokens

        return commit

    def client_label(self, client: str) -> str:
        return client if client in self._clients else "jwt"

    def finished(self, request: web.Request, ex: Exchange, now: float) -> None:
        """The tracing middleware's finish hook: one call per request, when it has ended."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        child = self._requests.get((route, ex.status))
        if child is None:
            child = self._requests[route, ex.status] = self.requests.labels(route, str(ex.status))
        child.inc()
        self.duration.observe(now - ex.started)
        if ex.ttfb is not None:
            self.ttfb.observe(ex.ttfb - ex.started)
        if ex.outcome == "client_disconnected":
            self.client_disconnects.inc()
        if ex.status == 429 and ex.reason:
            self.throttled.labels(ex.reason).inc()
        if ex.usage is not None:
            identity = request.get(IDENTITY)
            client = ex.client or (identity.client if identity is not None else "anonymous")
            self.charge(client, ex.usage)

    def charge(self, client: str, usage: Usage) -> None:
        """Count a request's tokens: a relayed one (from `finished`) or a detached generation's
        (which ends after its request did), so that `tokens_total` agrees with `/v1/usage`."""
        label = self.client_label(client)
        self._tokens[label, "prompt"].inc(usage.prompt_tokens)
        self._tokens[label, "completion"].inc(usage.completion_tokens)


def _peer_allowed(
    request: web.Request, allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    # The TCP peer itself, never X-Forwarded-For: a scrape is not a proxied client request.
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return False
    try:
        ip = ipaddress.ip_address(peer[0])
    except ValueError:  # a Unix socket path
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in allow)


# Headers a reverse proxy adds to what it relays. Behind nginx every peer is 127.0.0.1, so the
# peer allow-list alone would serve the metrics to the world through the proxy; a scrape is
# never relayed, so a request carrying one of these is refused whatever its peer: X-Real-IP
# (the one some nginx setups add alone) and Via (RFC 9110 7.6.3: every proxy adds it) too.
_PROXIED = (hdrs.X_FORWARDED_FOR, hdrs.FORWARDED, "X-Real-IP", hdrs.VIA)


async def metrics_handler(request: web.Request) -> web.Response:
    """GET [metrics].path: Prometheus text format, for `[metrics].allow` peers only, and
    never for a request that came through a proxy."""
    metrics = request.app[METRICS]
    if any(h in request.headers for h in _PROXIED):
        raise Forbidden("Metrics are not served through a proxy", code="metrics_forbidden")
    if not _peer_allowed(request, metrics.allow):
        raise Forbidden("Metrics are not served to this address", code="metrics_forbidden")
    return web.Response(
        body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
