"""The benchmark's upstream: OpenAI-shaped answers from a raw asyncio protocol.

The bundled mock (gateway/mock_upstream.py) is an aiohttp app: fine for tests, but on a 2-core
machine it would cost more CPU than the proxy under test. This one parses HTTP/1.1 by hand,
keeps connections alive, and writes pre-encoded chunked frames, so it stays far from being
the bottleneck. Same knobs as the mock: `x-mock-chunks` content chunks a stream (default 20)
and `x-mock-delay` seconds between events (default 0); `"stream": true` in the body asks for
SSE, `"include_usage": true` adds OpenAI's `"usage": null` keys and the usage-only chunk.

    python -m tests.bench.upstream --port 0 --port-file PATH
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import signal
from collections.abc import Callable

import orjson

_STREAM = re.compile(rb'"stream"\s*:\s*true')
_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_LAST_CHUNK = b"0\r\n\r\n"
_NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error","code":null}}'
MAX_HEAD = 64 << 10


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def sse_frames(chunks: int, usage: bool) -> list[bytes]:
    """One stream's chunked-encoded events, the way the bundled mock shapes them."""
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
    }
    deltas = [{"role": "assistant", "content": ""}] + [
        {"content": f" word{i}"} for i in range(chunks)
    ]
    events = []
    for i, delta in enumerate([*deltas, {}]):
        last = i == len(deltas)
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": "stop" if last else None,
        }
        chunk: dict[str, object] = {**base, "choices": [choice]}
        if usage:
            chunk["usage"] = None
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if usage:
        counts = {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks}
        events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": counts}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return [_chunk(e) for e in events]


def json_answer(chunks: int) -> bytes:
    message = {"role": "assistant", "content": "".join(f" word{i}" for i in range(chunks))}
    body = orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": "bench",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks},
        }
    )
    return _answer(200, body)


def _answer(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


class Cache:
    """Encoded answers by (chunks, usage): built once, shared by every connection."""

    def __init__(self) -> None:
        self.frames: dict[tuple[int, bool], list[bytes]] = {}
        self.json: dict[int, bytes] = {}
        self.models = _answer(200, b'{"object":"list","data":[{"id":"bench","object":"model"}]}')

    def sse(self, chunks: int, usage: bool) -> list[bytes]:
        frames = self.frames.get((chunks, usage))
        if frames is None:
            frames = self.frames[chunks, usage] = sse_frames(chunks, usage)
        return frames

    def answer(self, chunks: int) -> bytes:
        data = self.json.get(chunks)
        if data is None:
            data = self.json[chunks] = json_answer(chunks)
        return data


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time (no pipelining needed)."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self._loop = asyncio.get_running_loop()
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._frames: list[bytes] = []
        self._next = 0
        self._start = 0.0
        self._delay = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._streaming:
            self._serve()

    def _serve(self) -> None:
        t = self._transport
        while t is not None and not self._streaming:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    t.close()
                return
            head = buf[:end].lower()
            length, chunks, delay = 0, 20, 0.0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name == b"content-length":
                    length = int(value)
                elif name == b"x-mock-chunks":
                    chunks = int(value)
                elif name == b"x-mock-delay":
                    delay = float(value)
            if len(buf) < end + 4 + length:
                return
            body = buf[end + 4 : end + 4 + length]
            self._buf = buf[end + 4 + length :]
            target = head[: head.find(b"\r\n")] if b"\r\n" in head else head
            if target.startswith(b"get /v1/models"):
                t.write(self._cache.models)
            elif not target.startswith(b"post /v1/chat/completions"):
                t.write(_answer(404, _NOT_FOUND))
            elif _STREAM.search(body) is None:
                t.write(self._cache.answer(chunks))
            else:
                self._stream(self._cache.sse(chunks, _USAGE.search(body) is not None), delay)

    def _stream(self, frames: list[bytes], delay: float) -> None:
        t = self._transport
        assert t is not None
        if not delay:
            t.write(_SSE_HEAD)
            for frame in frames:  # one write per event, as a real upstream sends tokens
                t.write(frame)
            t.write(_LAST_CHUNK)
            return
        t.write(_SSE_HEAD + frames[0])
        self._frames, self._next, self._delay = frames, 1, delay
        self._start = self._loop.time()
        self._streaming = True
        self._timer = self._loop.call_at(self._start + delay, self._tick)

    def _tick(self) -> None:
        t = self._transport
        if t is None:
            return
        t.write(self._frames[self._next])
        self._next += 1
        if self._next < len(self._frames):
            self._timer = self._loop.call_at(self._start + self._next * self._delay, self._tick)
            return
        t.write(_LAST_CHUNK)
        self._timer = None
        self._streaming = False
        if self._buf:
            self._serve()


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def serve(host: str, port: int, ready: Callable[[int], None]) -> None:
    loop = asyncio.get_running_loop()
    cache = Cache()
    server = await loop.create_server(
        lambda: UpstreamProtocol(cache), host, port, backlog=4096, reuse_address=True
    )
    ready(server.sockets[0].getsockname()[1])
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", help="write the bound port here once listening")
    args = parser.parse_args()
    raise_nofile()

    def ready(port: int) -> None:
        if args.port_file:
            tmp = args.port_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(port))
            os.replace(tmp, args.port_file)
        print(f"bench upstream on http://{args.host}:{port}/v1", flush=True)

    import uvloop

    uvloop.run(serve(args.host, args.port, ready))


if __name__ == "__main__":
    main()
