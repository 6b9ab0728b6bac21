"""The composition root: `create_app(cfg)` alone knows the middlewares, routes and resources."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from . import demo, health, relay
from .aiohttp_seams import NEEDS_CLEANUP_CLOSED
from .backends import backends
from .config import Config
from .health import READINESS, ReadinessChecks
from .metrics import METRICS, Metrics, metrics_handler
from .middlewares.auth import make_auth_middleware
from .middlewares.cors import make_cors_middleware
from .middlewares.drain import make_drain_middleware
from .middlewares.errors import make_errors_middleware
from .middlewares.ipthrottle import make_ip_throttle_middleware
from .middlewares.throttle import make_client_throttle_middleware
from .middlewares.tracing import make_tracing_middleware, on_prepare
from .policy import POLICY, PolicyHolder
from .process.drain import DRAIN, Drain
from .process.reload import RELOADERS, Reloaders
from .responses import handlers as responses
from .state import CONFIG, FINISHED, HTTP, PUBLIC, UNCOUNTED, UNMETERED, Finisher
from .streams import handlers as streams
from .streams.registry import streams_ctx
from .ticker import TICKER, Ticker, tick_period
from .upstream.pool import UPSTREAMS, UpstreamPool
from .usage.accounting import Accounting, usage_handler

if TYPE_CHECKING:
    from .otel import Tracing


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    """One ClientSession for the app's life; its pool sized from the upstreams' config."""
    cfg = app[CONFIG]
    connector = aiohttp.TCPConnector(
        limit=sum(u.max_connections for u in cfg.upstreams),
        limit_per_host=max(u.max_connections for u in cfg.upstreams),
        keepalive_timeout=30,
        enable_cleanup_closed=NEEDS_CLEANUP_CLOSED,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        # Per-request timeouts come from each upstream; none here (the default total=300 s
        # would cut long streams).
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
    )
    app[HTTP] = session
    app[UPSTREAMS] = UpstreamPool(cfg, session, app[METRICS], app[TICKER])
    app[RELOADERS].add("upstreams", app[UPSTREAMS].prepare_reload)
    yield
    await session.close()


def create_app(cfg: Config) -> web.Application:
    """Build the gateway's one Application from a validated config."""
    # Keys, limits and CORS derived from the config; a reload swaps them: policy.replace(cfg).
    policy = PolicyHolder(cfg)
    drain = Drain()
    metrics = Metrics(cfg)
    tracing: Tracing | None = None
    if cfg.tracing.endpoint:  # else nothing of OpenTelemetry is even imported
        from . import otel

        tracing = otel.Tracing(cfg.tracing, metrics.trace_spans_dropped)
    app = web.Application(
        client_max_size=cfg.server.max_body_bytes,
        # Outermost first.
        # tracing: every response gets a request id and an access line, even errors below
        #   (and, with [tracing] on, a SERVER span with the same ids).
        # cors: outside errors, so rendered 401/429s carry the headers a browser needs to
        #   read them; answers preflights before anything asks for credentials.
        # errors: renders the error tree as OpenAI JSON for everything below it.
        # drain: counts what is in flight; after SIGTERM refuses new work before anything
        #   below spends effort on it.
        # ip throttle: before auth, so a flood of bad credentials is refused cheaply.
        # auth: who is calling (skips public routes).
        # client throttle: that caller's rpm, tpm and concurrency slot, held around the handler.
        middlewares=[
            make_tracing_middleware(tracing),
            make_cors_middleware(policy),
            make_errors_middleware(),
            make_drain_middleware(drain),
            make_ip_throttle_middleware(policy),
            make_auth_middleware(policy),
            make_client_throttle_middleware(policy),
        ],
    )
    app[CONFIG] = cfg
    app[POLICY] = policy
    app[READINESS] = ReadinessChecks()
    app[METRICS] = metrics
    accounting = Accounting()
    # Called when each request has ended (see the tracing middleware).
    finishers: list[Finisher] = [metrics.finished, accounting.finished]
    if tracing is not None:
        app[otel.TRACING] = tracing
        finishers.append(tracing.finished)  # last: the spans get what the others noted
        # The export thread, first of all the resources so that it stops last: its final
        # flush comes after every request and detached generation has ended its spans.
        app.cleanup_ctx.append(otel.tracing_ctx)
    app[FINISHED] = finishers
    app[DRAIN] = drain
    # One timer for every open stream's heartbeat, write deadline and upstream watchdog.
    app[TICKER] = Ticker(tick_period(cfg))
    app[READINESS].add("draining", drain.readiness)
    app[RELOADERS] = Reloaders(cfg)
    app[RELOADERS].add("policy", policy.prepare_reload)
    app[RELOADERS].add("ticker", app[TICKER].prepare_reload)
    app[streams.FOLLOWERS] = streams.Followers(cfg.sse.max_followers)
    # Client labels of tokens_total: a client added by a reload is counted under its name.
    app[RELOADERS].add("metrics", metrics.prepare_reload)
    # Limits, usage totals and detached streams' logs: memory, or one Redis shared by every
    # instance. First, so it closes last, after everything that uses it.
    app.cleanup_ctx.append(backends)
    app.cleanup_ctx.append(_http_session)
    # X-Request-ID and the middlewares' headers (`headers.add_response_headers`) in one hook.
    app.on_response_prepare.append(on_prepare)

    app.router.add_get("/healthz", health.healthz, name=f"{UNMETERED}healthz")
    app.router.add_get("/readyz", health.readyz, name=f"{UNMETERED}readyz")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, relay.relay_post)
    # Background responses (the rest of /v1/responses is relayed by `responses.create`).
    app.router.add_post("/v1/responses", responses.create)
    # Its own routes take no concurrency slot: the generation holds one already.
    response = app.router.add_resource("/v1/responses/{id}", name=f"{UNCOUNTED}response")
    response.add_route("GET", responses.retrieve)
    response.add_route("DELETE", responses.delete)
    app.router.add_post(
        "/v1/responses/{id}/cancel", responses.cancel, name=f"{UNCOUNTED}response_cancel"
    )
    app.router.add_get("/v1/models", relay.relay_get)
    app.router.add_get("/v1/models/{model:[^/]+}", relay.relay_get)
    app.router.add_get("/v1/usage", usage_handler)
    # Public to auth: guarded by the [metrics].allow peer list instead.
    app.router.add_get(cfg.metrics.path, metrics_handler, name=f"{UNMETERED}metrics")
    # Last in, first out at cleanup: pending usage records finish before the stores close.
    app.cleanup_ctx.append(accounting.drain)
    # Last of all: at cleanup detached generations end first, while the session and the
    # usage stores they write to are still open.
    app.cleanup_ctx.append(streams_ctx)
    # Detached streams: POST is authenticated; the unguessable id authorizes GET and DELETE.
    app.router.add_post("/v1/streams", streams.start_stream)
    stream = app.router.add_resource("/v1/streams/{id}", name=f"{PUBLIC}stream")
    stream.add_route("GET", streams.follow_stream)
    stream.add_route("DELETE", streams.stop_stream)
    demo.add_routes(app)
    return app
