"""SIGHUP: re-read the config file and swap what derives from it, without dropping a stream.

Each component that derives objects from the config registers a *prepare* function with
`app[RELOADERS].add(name, prepare)`. A reload has two phases so that a bad file changes
nothing:

1. parse and validate the file (the same loader as start-up), then call every `prepare(cfg)`:
   it builds the new derived objects (key tables, limiters, CORS headers, upstream lists)
   and returns a `commit` callable, or raises `ValueError` to refuse the new config;
2. only when every part prepared, call every `commit()`: plain attribute swaps, nothing that
   can fail halfway.

A request reads the component's current objects when it starts; a stream already running
keeps the objects it started with (its upstream response, its slot), so it is never dropped.
`app[CONFIG]` stays the config the app was built from (aiohttp freezes app state once it
runs); sections that only take effect at start-up are listed in `RESTART_ONLY` and a change
there is logged as needing a restart.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import structlog
from aiohttp import web

from .. import config
from ..config import Config

log = structlog.get_logger("gateway.reload")

Commit = Callable[[], None]
Prepare = Callable[[Config], Commit]

# The SIGHUP reload hooks.
RELOADERS: web.AppKey[Reloaders] = web.AppKey("reloaders")

# Read once at start-up: the listener, process layout, logging, routes, stream settings and
# the limits backend's connection.
RESTART_ONLY = (
    "server", "sse", "logging", "metrics", "tracing",
    "limits.backend", "limits.redis_url", "limits.on_redis_error", "limits.lease_ttl",
    "limits.redis_mode", "limits.sentinels", "limits.sentinel_master", "limits.tls_ca_file",
    "limits.tls_cert_file", "limits.tls_key_file",
)


class Reloaders:
    """The registered prepare functions and the config currently in force."""

    def __init__(self, cfg: Config) -> None:
        self.current = cfg
        self._parts: list[tuple[str, Prepare]] = []

    def add(self, name: str, prepare: Prepare) -> None:
        self._parts.append((name, prepare))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._parts]

    def apply(self, cfg: Config) -> None:
        """Prepare every part, then commit them all; raises ValueError naming the part."""
        commits: list[Commit] = []
        for name, prepare in self._parts:
            try:
                commits.append(prepare(cfg))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from exc
        for commit in commits:
            commit()
        self.current = cfg


def restart_needed(old: Config, new: Config) -> list[str]:
    """The RESTART_ONLY keys whose value changed."""
    changed = []
    for path in RESTART_ONLY:
        a: object = old
        b: object = new
        for part in path.split("."):
            a, b = getattr(a, part), getattr(b, part)
        if a != b:
            changed.append(path)
    return changed


def reload(app: web.Application, cfg: Config) -> None:
    """Swap every registered component to `cfg` (already validated); ValueError refuses it."""
    reloaders = app[RELOADERS]
    old = reloaders.current
    reloaders.apply(cfg)
    for warning in cfg.warnings:
        log.warning("config_warning", detail=warning)
    changed = restart_needed(old, cfg)
    if changed:
        log.warning("reload_needs_restart", keys=changed)


def reload_file(app: web.Application, path: str) -> bool:
    """Re-read `path` and reload; a bad file keeps the old config and logs why."""
    try:
        # A --port given at start stays: the file's [server].port is not the one in force.
        cfg = config.with_port(config.load(path), app[RELOADERS].current.port_override)
        reload(app, cfg)
    except config.ConfigError as exc:
        log.error("reload_failed", path=path, problems=exc.problems, kept="previous config")
        return False
    except ValueError as exc:
        log.error("reload_failed", path=path, problems=[str(exc)], kept="previous config")
        return False
    log.info("reloaded", path=path, pid=os.getpid(), parts=app[RELOADERS].names)
    return True
