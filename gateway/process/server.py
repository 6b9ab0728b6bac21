"""Running the app: event loop, listener, signals, shutdown.

Shutdown reads like a script (`shutdown()`): say we are draining, stop accepting, let
in-flight work finish within the grace period, then end the rest cleanly and exit 0.
SIGHUP reloads the config file (`process.reload`). With `[server].workers > 1` the process
started by `gateway serve` is a supervisor (`process.supervisor`) and this runs in each worker.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import signal
import socket

import structlog
from aiohttp import web

from .. import logs
from ..app import create_app
from ..config import Config
from ..state import CONFIG
from . import notify
from .drain import DRAIN
from .reload import RELOADERS, reload_file

log = structlog.get_logger("gateway.server")

# After the grace: how long ended streams get to write their error event and close, and then
# how long aiohttp waits for stragglers before cancelling them. Everything after the grace is
# bounded by 2 * FINISH_TIMEOUT: systemd's TimeoutStopSec must exceed shutdown_grace + that.
FINISH_TIMEOUT = 5.0


# The cyclic collector runs once this many more containers were made than freed (CPython's
# default is 700). A request's objects are freed by reference counting as it ends, so what
# the count measures is cycles and work in flight: at 700, 64 streams in flight triggered a
# collection every dozen requests and a full one every ~1,500 (40 ms each, over every module
# and pool the process holds), 8% of the CPU per request in `make bench`.
GC_THRESHOLD = (10_000, 10, 10)


def tune_gc() -> None:
    """Once serving: what was built to serve (modules, config, app, pools) is frozen out of
    every collection, and young collections wait for GC_THRESHOLD."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


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
    reuse_port: bool = False,
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
        # aiohttp's own default is an hour; it also bounds how long a request's headers may
        # take to arrive (a slowloris client is closed when it runs out).
        keepalive_timeout=app[CONFIG].server.keepalive_timeout,
    )
    await runner.setup()
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock)
    else:
        # reuse_port: each worker binds its own listener on the shared port (SO_REUSEPORT);
        # the kernel spreads new connections among them.
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_port=reuse_port or None)
    await site.start()
    bound: int = runner.addresses[-1][1] if runner.addresses else port
    return runner, bound


async def shutdown(runner: web.AppRunner, app: web.Application, grace: float) -> None:
    """Drain and stop: the SIGTERM script (tests call it directly)."""
    drain = app[DRAIN]
    drain.begin()  # /readyz 503, new /v1 work 503
    notify.stopping()
    for site in list(runner.sites):
        await site.stop()  # stop accepting; open connections stay
    log.info("draining", in_flight=drain.inflight, grace=grace)
    idle = await drain.wait_idle(grace)
    # After the grace, everything left (ending the streams, closing connections, the
    # resources' cleanup) has 2 * FINISH_TIMEOUT, so systemd's TimeoutStopSec can be set
    # with a margin that holds whatever a cleanup step does.
    deadline = asyncio.get_running_loop().time() + 2 * FINISH_TIMEOUT
    try:
        async with asyncio.timeout_at(deadline):
            if not idle:
                log.warning("grace_expired", in_flight=drain.inflight, ending=len(drain.responses))
                await drain.end_inflight()
                await drain.wait_idle(FINISH_TIMEOUT)
            # Closes idle keep-alive connections, cancels what is left, closes the upstream
            # session and the other resources.
            await runner.cleanup()
    except TimeoutError:
        log.error("cleanup_timed_out", after=2 * FINISH_TIMEOUT)


class EarlyHangup:
    """SIGHUP before the event loop's handlers exist: remembered, never the default action
    (which kills the process). Installed first thing by `serve`."""

    def __init__(self) -> None:
        self.pending = False
        signal.signal(signal.SIGHUP, self._remember)

    def _remember(self, _signum: int, _frame: object) -> None:
        self.pending = True


async def _serve(
    cfg: Config, *, worker: bool, early: EarlyHangup, redactor: logs.Redactor | None = None
) -> int:
    """What each signal does in each phase:

    | phase    | SIGHUP                            | SIGTERM (SIGINT unless a worker) |
    |----------|-----------------------------------|----------------------------------|
    | starting | remembered, applied once serving  | stop once started                |
    | serving  | reload the config file            | drain, then stop                 |
    | draining | ignored, with a log line          | end the grace now                |
    """
    app = create_app(cfg)
    if redactor is not None:  # secrets added by a SIGHUP are masked in the logs too
        app[RELOADERS].add("log_secrets", redactor.prepare_reload)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    phase = "starting"

    def hangup() -> None:
        if phase == "starting":
            early.pending = True
        elif phase == "serving":
            reload_file(app, cfg.source)
        else:
            log.info("reload_ignored", reason=phase, pid=os.getpid())

    def terminate() -> None:
        if phase == "draining":
            app[DRAIN].hurry()  # a second one: do not wait out the grace
        else:
            stop.set()

    # A worker hears only its supervisor (TERM): Ctrl-C in a terminal reaches the whole
    # process group, and the supervisor forwards it.
    stop_signals = (signal.SIGTERM,) if worker else (signal.SIGINT, signal.SIGTERM)
    if worker:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in stop_signals:
        loop.add_signal_handler(sig, terminate)
    loop.add_signal_handler(signal.SIGHUP, hangup)
    runner, port = await start(
        app,
        cfg.server.host,
        cfg.server.port,
        shutdown_timeout=FINISH_TIMEOUT,
        reuse_port=worker,
    )
    phase = "serving"
    tune_gc()
    log.info("listening", host=cfg.server.host, port=port, pid=os.getpid())
    notify.ready(f"listening on {cfg.server.host}:{port}")
    if early.pending:
        log.info("reload_after_start", pid=os.getpid())
        reload_file(app, cfg.source)
    await stop.wait()
    phase = "draining"
    log.info("shutting_down", grace=cfg.server.shutdown_grace)
    await shutdown(runner, app, cfg.server.shutdown_grace)
    log.info("stopped")
    return 0


def serve(cfg: Config, *, worker: bool = False) -> int:
    """Run the gateway until SIGTERM/SIGINT; returns the exit code.

    With `workers > 1` (and not already a worker) this process supervises the workers.
    """
    early = EarlyHangup()
    redactor = logs.configure(cfg.logging, secrets=logs.config_secrets(cfg), cache=True)
    for warning in cfg.warnings:
        log.warning("config_warning", detail=warning)
    soft, hard = raise_nofile_limit()
    log.info("nofile_limit", soft=soft, hard=hard)
    try:
        if cfg.server.workers > 1 and not worker:
            from .supervisor import supervise

            return supervise(cfg)
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
            return asyncio.run(_serve(cfg, worker=worker, early=early, redactor=redactor))
        return uvloop.run(_serve(cfg, worker=worker, early=early, redactor=redactor))
    finally:
        # The loop's handlers are gone with it: a HUP now must not kill a process that is
        # about to exit 0.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
