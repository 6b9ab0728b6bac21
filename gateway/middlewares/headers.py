"""Headers a middleware decided on, applied when the response is prepared.

A streaming handler prepares its response before returning to the middlewares, so headers
they add afterwards would be too late. They put them in `request[RESPONSE_HEADERS]` instead,
and `apply_response_headers`, called by the app's one `on_response_prepare` hook
(`tracing.on_prepare`), sets them on whatever response goes out: a JSON answer, a rendered
error or a stream.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from ..state import RESPONSE_HEADERS


def add_response_headers(request: web.Request, headers: Mapping[str, str]) -> None:
    """Ask for `headers` on this request's response (later calls win on the same name)."""
    pending = request.get(RESPONSE_HEADERS)
    if pending is None:
        request[RESPONSE_HEADERS] = dict(headers)
    else:
        pending.update(headers)


def apply_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Set the headers asked for with `add_response_headers` on `response` (a Vary adds).

    Taken off the request: they are on their way, and a stream's request lives on."""
    pending = request.pop(RESPONSE_HEADERS, None)
    if not pending:
        return
    out = response.headers
    for name, value in pending.items():
        if name == "Vary" and "Vary" in out:
            if value.lower() not in out["Vary"].lower():
                out["Vary"] = f"{out['Vary']}, {value}"
        else:
            out[name] = value
