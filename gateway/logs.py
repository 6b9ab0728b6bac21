"""structlog, configured once at start: JSON lines for journald, or a console view.

Request context (request_id, trace_id, client) is bound through contextvars by the tracing
middleware, so every line of a request carries it. `redact` runs last before rendering:
whatever an error path puts into a line, a key, a bearer token or a JWT never gets out.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from .config import LoggingConfig

# Gateway keys (gw-...), OpenAI-style keys (sk-...), bearer tokens and JWTs (three base64url
# parts, the first starting with eyJ).
_SECRET = re.compile(
    r"(?:\bgw-[A-Za-z0-9_\-]{8,})"
    r"|(?:\bsk-[A-Za-z0-9_\-]{8,})"
    r"|(?:\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*)"
    r"|(?:(?<=Bearer )[^\s\"',]+)",
    re.IGNORECASE,
)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _SECRET.sub("[REDACTED]", value) if ("-" in value or "." in value or " " in value) else value
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def redact(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask anything shaped like a secret, in every field."""
    for key, value in event_dict.items():
        if isinstance(value, (str, dict, list, tuple)):
            event_dict[key] = _scrub(value)
    return event_dict


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure(cfg: LoggingConfig, stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library's logging once, for the whole process."""
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
        cache_logger_on_first_use=False,
    )
    # aiohttp and asyncio log through the standard library: same destination, same format.
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redact, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = True  # we write our own access line
