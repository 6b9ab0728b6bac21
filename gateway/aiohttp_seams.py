"""Where the gateway leans on aiohttp beyond its documented API: every such use, in one room.

Each seam is one small function; `tests/test_aiohttp_seams.py` checks every one against the
installed aiohttp, so an upgrade that changes them fails there, loudly, not in production.

- `on_connection_release`: a callback when the connection under a client response goes back
  to the pool or is closed, whichever way the response ends (`Connection.add_callback`).
  It holds an upstream's `max_connections` slot for exactly the connection's use.
- `fail_body`: make the pending (or next) read of an upstream body raise `exc`; the drain
  ends relays this way so each writes its own error event (`StreamReader.set_exception`).
- `bytes_received`: body bytes an upstream response has received so far, read or not
  (`StreamReader.total_bytes`): the upstream watchdog's sign of life.
- `unread_bytes`: body bytes an upstream response holds that its reader has not taken yet
  (`StreamReader._size`): a reader behind (a slow client) is no upstream silence.
- `bytes_sent`: bytes a server response handed to its transport (`writer.output_size`).
- `NEEDS_CLEANUP_CLOSED`: whether this Python still needs aiohttp's `enable_cleanup_closed`
  (CPython fixed the leak it works around in 3.12.7 and 3.13.1; asking for it on a fixed
  Python is a DeprecationWarning).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import aiohttp
from aiohttp import web

NEEDS_CLEANUP_CLOSED = sys.version_info < (3, 12, 7) or (3, 13, 0) <= sys.version_info < (
    3,
    13,
    1,
)


def on_connection_release(response: aiohttp.ClientResponse, callback: Callable[[], None]) -> bool:
    """Call `callback` once when the response's connection is released or closed.

    False when the response holds no connection any more (its whole body was read already
    and the connection went back): the caller runs `callback` itself.
    """
    connection = response.connection
    if connection is None:
        return False
    connection.add_callback(callback)
    return True


def fail_body(response: aiohttp.ClientResponse, exc: BaseException) -> None:
    """The body's pending or next read raises `exc`."""
    response.content.set_exception(exc)


def bytes_received(response: aiohttp.ClientResponse) -> int:
    """Body bytes that arrived for `response` so far (decoded, whether read yet or not)."""
    return response.content.total_bytes


def unread_bytes(response: aiohttp.ClientResponse) -> int:
    """Body bytes buffered for `response` and not read yet."""
    size: int = response.content._size
    return size


def bytes_sent(request: web.BaseRequest) -> int:
    """Bytes of the response (headers included) handed to the transport so far."""
    return request.writer.output_size
