"""Running the app: event loop, listener, signals, shutdown.

Shutdown reads like a script: stop accepting, let in-flight work finish within the grace
period, then end the rest and exit 0.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import socket

import structlog
from aiohttp import web

from . import logs
from .app import create_app
from .config import Config

log = structlog.get_logger("gateway.server")


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (like nginx's worker_rlimit_nofile):
    a relayed stream needs two descriptors, and the default soft limit is often 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft, hard


async def start(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float = 30.0,
    sock: socket.socket | None = None,
) -> tuple[web.AppRunner, int]:
    """Start serving `app`; returns the runner and the bound port (for port 0)."""
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,  # the tracing middleware writes the access line
        # A client that disconnects cancels its handler, so the upstream request is closed
        # at once instead of at the next write.
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        bound = server.sockets[0].getsockname()[1]
    return runner, bound


async def _serve(cfg: Config) -> int:
    app = create_app(cfg)
    runner, port = await start(
        app, cfg.server.host, cfg.server.port, shutdown_timeout=cfg.server.shutdown_grace
    )
    log.info("listening", host=cfg.server.host, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting_down", grace=cfg.server.shutdown_grace)
    finally:
        await runner.cleanup()
    log.info("stopped")
    return 0


def serve(cfg: Config) -> int:
    """Run the gateway until SIGTERM/SIGINT; returns the exit code."""
    logs.configure(cfg.logging, secrets=logs.config_secrets(cfg))
    for warning in cfg.warnings:
        log.warning("config_warning", detail=warning)
    soft, hard = raise_nofile_limit()
    log.info("nofile_limit", soft=soft, hard=hard)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(_serve(cfg))
    return uvloop.run(_serve(cfg))
