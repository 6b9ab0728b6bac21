"""The demo page at `/`: plain HTML and JS from the package, no build step.

Files are read once when the routes are added and served from memory by name: only the
names in `_FILES` exist, so no request path ever reaches the file system (no traversal).
Every response carries a strict Content-Security-Policy (no inline script or style, no
other origin) and `nosniff`, so each file is only ever what its content type says.
`/demo/config` tells the page whether to ask for a key.
"""

from __future__ import annotations

from importlib import resources

import orjson
from aiohttp import web

from .errors import NotFound
from .state import CONFIG, UNMETERED

_FILES = {
    "index.html": "text/html",
    "demo.js": "text/javascript",
    "demo.css": "text/css",
    "favicon.svg": "image/svg+xml",
}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

# The model the page proposes when the upstreams accept any name.
DEFAULT_MODEL = "gpt-4o-mini"


def _load() -> dict[str, bytes]:
    root = resources.files("gateway") / "static"
    return {name: (root / name).read_bytes() for name in _FILES}


def _settings(app: web.Application) -> bytes:
    cfg = app[CONFIG]
    named = [m for u in cfg.upstreams for m in u.models if not any(c in m for c in "*?[")]
    return orjson.dumps(
        {"key_required": cfg.auth.mode != "none", "model": named[0] if named else DEFAULT_MODEL}
    )


def _file(name: str, body: bytes) -> web.Response:
    resp = web.Response(body=body, headers=_HEADERS)
    resp.content_type = _FILES[name]
    resp.charset = "utf-8"
    return resp


def add_routes(app: web.Application) -> None:
    """Serve the page at /, its files at /static/{name}, its settings at /demo/config.

    Files and settings are read here, once; the handlers only pick bytes by name."""
    files = _load()
    config = _settings(app)

    async def index(request: web.Request) -> web.Response:
        return _file("index.html", files["index.html"])

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == "index.html" or name not in files:
            raise NotFound("Unknown route", code="unknown_route")
        return _file(name, files[name])

    async def settings(request: web.Request) -> web.Response:
        return web.Response(body=config, content_type="application/json", headers=_HEADERS)

    app.router.add_get("/", index, name=f"{UNMETERED}index")
    app.router.add_get("/static/{name}", asset, name=f"{UNMETERED}static")
    app.router.add_get("/demo/config", settings, name=f"{UNMETERED}demo-config")
