"""The benchmark's SSE load generator: raw asyncio protocol, keep-alive, bounded.

h2load counts requests; this counts events: time to first event (request written -> first
complete event read) and the gaps between events, per stream, over as many concurrent
keep-alive connections as asked. A stream is an error unless it answered 200, ended its
chunked body cleanly, carried `data: [DONE]` and no `{"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

MAX_BUFFER = 1 << 20


@dataclass
class Stats:
    """What a run of streams measured."""

    ttfe: array[float] = field(default_factory=lambda: array("d"))
    gaps: array[float] = field(default_factory=lambda: array("d"))
    events: int = 0
    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_events: int = 0  # streams that have seen their first event
    wall: float = 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def add(self, other: Stats) -> None:
        """Count `other`'s run in with this one (rounds of one target)."""
        self.ttfe.extend(other.ttfe)
        self.gaps.extend(other.gaps)
        self.events += other.events
        self.completed += other.completed
        self.first_events += other.first_events
        self.errors.update(other.errors)
        self.wall += other.wall


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, stats: Stats, record_gaps: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stats = stats
        self._gaps = stats.gaps if record_gaps else None
        self.transport: asyncio.Transport | None = None
        self.lost = self._loop.create_future()
        self._fut: asyncio.Future[str | None] | None = None
        self._reset()

    def _reset(self) -> None:
        self._buf = b""
        self._status: int | None = None
        self._chunked = False
        self._length = -1
        self._close = False
        self._sent = 0.0
        self._last: float | None = None
        self._done = False
        self._failed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)
        self._finish("connection_lost")

    def request(self, data: bytes) -> asyncio.Future[str | None]:
        assert self.transport is not None
        self._reset()
        self._fut = self._loop.create_future()
        self._sent = time.perf_counter()
        self.transport.write(data)
        return self._fut

    def _finish(self, error: str | None) -> None:
        fut, self._fut = self._fut, None
        if fut is not None and not fut.done():
            fut.set_result(error)

    @property
    def reusable(self) -> bool:
        return self.transport is not None and not self._close

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self._buf + data
        if self._status is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                if len(buf) > MAX_BUFFER:
                    self._finish("bad_response")
                return
            lines = buf[:end].lower().split(b"\r\n")
            self._status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                value = value.strip()
                if name == b"transfer-encoding" and value == b"chunked":
                    self._chunked = True
                elif name == b"content-length":
                    self._length = int(value)
                elif name == b"connection" and value == b"close":
                    self._close = True
            buf = buf[end + 4 :]
        if not self._chunked:
            if 0 <= self._length <= len(buf):
                self._payload(buf[: self._length], now)
                self._buf = b""
                self._end()
            else:
                self._buf = buf
            return
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            if size == 0:
                if len(buf) < eol + 4:
                    break
                pos = eol + 4
                self._buf = b""
                self._end()
                return
            if len(buf) < eol + 2 + size + 2:
                break
            self._payload(buf[eol + 2 : eol + 2 + size], now)
            pos = eol + 2 + size + 2
        self._buf = buf[pos:]

    def _payload(self, data: bytes, now: float) -> None:
        n = data.count(b"\n\n")
        if self._status != 200:
            return
        if n:
            stats = self._stats
            if self._last is None:
                stats.ttfe.append(now - self._sent)
                stats.first_events += 1
                n -= 1
            elif self._gaps is not None:
                self._gaps.append(now - self._last)
                n -= 1
            if n and self._gaps is not None:
                self._gaps.extend([0.0] * n)
            self._last = now
            stats.events += n + 1
        if b"[DONE]" in data:
            self._done = True
        if b'data: {"error"' in data:
            self._failed = True

    def _end(self) -> None:
        if self._status != 200:
            self._finish(f"status_{self._status}")
        elif self._failed:
            self._finish("error_event")
        elif not self._done and self._length < 0:
            self._finish("no_done")
        else:
            self._finish(None)


async def run_streams(
    host: str,
    port: int,
    request: bytes,
    *,
    concurrency: int,
    total: int,
    deadline: float,
    record_gaps: bool = False,
    connect_limit: int = 256,
    stats: Stats | None = None,
) -> Stats:
    """Run `total` requests over `concurrency` connections; stop at `deadline` seconds.

    Streams still running at the deadline count as `timeout` errors.
    """
    loop = asyncio.get_running_loop()
    stats = Stats() if stats is None else stats
    started = 0
    connecting = asyncio.Semaphore(connect_limit)
    conns: list[_Conn] = []

    async def connect() -> _Conn:
        async with connecting:
            _, proto = await loop.create_connection(lambda: _Conn(stats, record_gaps), host, port)
        conns.append(proto)
        return proto

    async def worker() -> None:
        nonlocal started
        conn: _Conn | None = None
        while started < total:
            started += 1
            try:
                if conn is None or not conn.reusable:
                    if conn is not None and conn.transport is not None:
                        conn.transport.close()
                    conn = await connect()
                error = await conn.request(request)
            except OSError as exc:
                error = f"connect_{type(exc).__name__}"
                conn = None
                await asyncio.sleep(0.05)
            if error is None:
                stats.completed += 1
            else:
                stats.errors[error] += 1
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, total))]
    done, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    if pending:
        stats.errors["timeout"] += total - stats.completed - stats.error_count
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            stats.errors[f"crash_{type(task.exception()).__name__}"] += 1
    for conn in conns:
        if conn.transport is not None:
            conn.transport.abort()
    stats.wall = time.perf_counter() - t0
    return stats


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """A raw HTTP/1.1 POST, keep-alive."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
