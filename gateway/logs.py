"""structlog, configured once at start: JSON lines for journald, or a console view.

Request context (request_id, trace_id, client) is bound through contextvars by the tracing
middleware, so every line of a request carries it. `redact` runs last before rendering:
whatever an error path puts into a line, a key, a bearer token or a JWT never gets out.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from .config import Config, LoggingConfig

# Gateway keys (gw-...), OpenAI-style keys (sk-...), bearer tokens and JWTs (three base64url
# parts, the first starting with eyJ). A JWT starts where no base64url character precedes it:
# with `\b` every "-eyJ" inside one long run was a start scanning to the run's end, quadratic
# in a client's value (a 64 KB model name held the event loop for seconds).
_SECRET = re.compile(
    r"(?:\bgw-[A-Za-z0-9_\-]{8,})"
    r"|(?:\bsk-[A-Za-z0-9_\-]{8,})"
    r"|(?:(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*)"
    r"|(?:(?<=Bearer )[^\s\"',]+)",
    re.IGNORECASE,
)


# Fields whose whole value is a credential, whatever it looks like.
_SECRET_NAMES = re.compile(
    r"authorization|api[_-]?key|token|secret|password|cookie", re.IGNORECASE
)
REDACTED = "[REDACTED]"
_SCALARS = frozenset({int, float, bool, type(None)})
_MAX_NAMES = 1024


class Redactor:
    """structlog processor: mask anything shaped like a secret, in every field.

    Three nets: fields named like a credential (`authorization`, `api_key`, `token`, ...),
    values shaped like one (gw-/sk- keys, JWTs, whatever follows `Bearer `), and the literal
    secrets of this config (upstream keys, the JWT secret) that may have any shape.
    """

    def __init__(self, literals: Iterable[str] = ()) -> None:
        self._literals: tuple[str, ...] = ()
        self.learn(literals)
        # Field names come from the code, a few dozen: each is judged by the regex once.
        self._names: dict[str, bool] = {}

    def learn(self, literals: Iterable[str]) -> None:
        """Mask these literal secrets too, besides those already known (never forgotten: a
        secret rotated out by a reload may still appear in a line of a stream in flight)."""
        known = set(self._literals) | {s for s in literals if len(s) >= 4}
        # Longest first, so a secret that contains another is masked whole.
        self._literals = tuple(sorted(known, key=len, reverse=True))

    def prepare_reload(self, cfg: Config) -> Callable[[], None]:
        """For `app[RELOADERS]`: learn the literal secrets of a reloaded config."""
        secrets = config_secrets(cfg)
        return lambda: self.learn(secrets)

    def _secret_name(self, name: str) -> bool:
        hit = self._names.get(name)
        if hit is None:
            hit = _SECRET_NAMES.search(name) is not None
            if len(self._names) < _MAX_NAMES:
                self._names[name] = hit
        return hit

    def scrub(self, value: Any, name: str = "") -> Any:
        if isinstance(value, str):
            if name and value and self._secret_name(name):
                return REDACTED
            for lit in self._literals:
                if lit in value:
                    value = value.replace(lit, REDACTED)
            if "-" in value or "." in value or " " in value:
                value = _SECRET.sub(REDACTED, value)
            return value
        if isinstance(value, Mapping):
            return {k: self.scrub(v, str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.scrub(v) for v in value]
        if isinstance(value, BaseException):
            return self.scrub(str(value))
        return value

    def __call__(
        self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if self._clean(event_dict):
            return event_dict
        for key, value in event_dict.items():
            # An access line is mostly numbers and None: skip those before the ABC check.
            if type(value) not in _SCALARS and isinstance(value, (str, Mapping, list, tuple)):
                event_dict[key] = self.scrub(value, key)
        return event_dict

    def _clean(self, event_dict: Mapping[str, Any]) -> bool:
        """True when no field can change: scalars and ASCII strings, no field named like a
        credential, no literal secret and none of the shapes' fixed parts (`gw-`, `sk-`,
        `eyJ`, `Bearer `, any case) in the values. The common line (an access line) is
        judged in one pass over its values joined, instead of a regex per field.

        Joined, a field's match is still a match (the separator is no word or base64url
        character, so `\\b` and the look-behinds see it as a field's start does); ASCII
        only, because `re.IGNORECASE` folds a few other letters onto `k` and `s`.
        """
        texts = []
        for key, value in event_dict.items():
            kind = type(value)
            if kind is str:
                if value and self._secret_name(key):
                    return False
                texts.append(value)
            elif kind not in _SCALARS:
                return False
        joined = "\0".join(texts)
        if not joined.isascii():
            return False
        for lit in self._literals:
            if lit in joined:
                return False
        low = joined.lower()
        return not any(part in low for part in _SHAPE_PARTS)


# What every match of `_SECRET` contains, lower-cased.
_SHAPE_PARTS = ("gw-", "sk-", "eyj", "bearer ")

redact = Redactor()
"""The processor with no literal secrets: patterns and field names only."""


def config_secrets(cfg: Config) -> list[str]:
    """The literal secrets a config holds, for `configure(..., secrets=...)`."""
    out = [u.api_key for u in cfg.upstreams if u.api_key]
    if cfg.auth.jwt.secret:
        out.append(cfg.auth.jwt.secret)
    out.extend(value for _, value in cfg.tracing.headers if value)  # a collector's auth
    return out


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure(
    cfg: LoggingConfig,
    stream: TextIO | None = None,
    *,
    secrets: Iterable[str] = (),
    cache: bool = False,
) -> Redactor:
    """Configure structlog and the standard library's logging once, for the whole process.

    `secrets` are literal values never to be written (see `config_secrets`); the returned
    redactor learns more of them on reload (`Redactor.prepare_reload`). `cache`: each
    module's logger is built on its first line and kept (the server, whose logging is
    set once per process); off, every line builds it again, so that tests can reconfigure."""
    redact = Redactor(secrets)
    level = getattr(logging, cfg.level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if cfg.format == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, redact, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=cache,
    )
    # aiohttp and asyncio log through the standard library: same destination, same format.
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = True  # we write our own access line
    return redact


# A detached stream's id is its only credential (GET and DELETE need nothing else): a log
# line or a span keeps a prefix, enough to match lines of one stream, not enough to use it.
_STREAM_PATH = "/v1/streams/"
_ID_PREFIX = 8


def loggable_path(path: str) -> str:
    """The path as the access line shows it: a detached stream's id cut to its prefix."""
    if path.startswith(_STREAM_PATH) and len(path) > len(_STREAM_PATH) + _ID_PREFIX:
        return path[: len(_STREAM_PATH) + _ID_PREFIX] + "\u2026"
    return path
