"""The write deadline for long responses: drop a client that stopped reading.

aiohttp's `StreamResponse.write()` waits for the socket to drain without limit, so a client
that keeps its connection open but reads nothing would hold a stream (its handler, its slot,
its upstream connection) forever. What it can make the gateway buffer is already bounded (the
transport pauses at its high-water mark, and `write()` then waits), so time is what needs the
bound.

A `WriteGuard` is sampled once per tick of the app's `Ticker`, never per chunk: progress is
the number of bytes the kernel has taken (everything handed to the transport minus what
still waits in its buffer). Pending bytes with no progress for `timeout` seconds: the
connection is reset, which cancels the handler (`handler_cancellation`) and ends the request
as `client_disconnected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from aiohttp import web

from .aiohttp_seams import bytes_sent
from .ticker import Ticker

_LINGER_RESET = struct.pack("ii", 1, 0)


class WriteGuard:
    """Decides, when asked, whether the client has taken no byte for `timeout` seconds."""

    __slots__ = ("_flushed", "_progress", "_request", "_timeout", "_transport")

    def __init__(self, request: web.BaseRequest, timeout: float, now: float) -> None:
        self._request = request
        self._transport = request.transport
        self._timeout = timeout
        self._flushed = -1
        self._progress = now

    @property
    def pending(self) -> int:
        """Bytes handed to the transport that the kernel has not taken yet."""
        t = self._transport
        return 0 if t is None or t.is_closing() else t.get_write_buffer_size()

    def stalled(self, now: float) -> bool:
        """True when bytes have been pending with no progress for `timeout` seconds."""
        pending = self.pending
        flushed = bytes_sent(self._request) - pending
        if pending == 0 or flushed != self._flushed:
            self._flushed, self._progress = flushed, now
            return False
        return now - self._progress >= self._timeout

    def drop(self) -> None:
        """Reset the connection: with SO_LINGER 0 the kernel sends RST and frees the send
        buffer now, instead of keeping an orphaned socket full of data the client never takes."""
        t = self._transport
        if t is None:
            return
        sock = t.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        t.abort()


class WriteDeadline:
    """A `WriteGuard` checked on the app's `Ticker`, for streams with no heartbeat to share
    it with. stop() when the response ends."""

    __slots__ = ("_guard", "_ticker")

    def __init__(self, request: web.BaseRequest, timeout: float, ticker: Ticker) -> None:
        self._guard = WriteGuard(request, timeout, asyncio.get_running_loop().time())
        self._ticker = ticker
        ticker.add(self)

    def tick(self, now: float) -> None:
        if self._guard.stalled(now):
            self._ticker.discard(self)
            self._guard.drop()

    def stop(self) -> None:
        self._ticker.discard(self)
