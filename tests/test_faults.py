"""An upstream that misbehaves on purpose: every fault ends for the client in a defined way,
the access line says how, and the gateway serves the next request normally.

The fault app is one real aiohttp server; the gateway forwards `x-fault` (the tests' upstreams
take it through `pass_headers`), so one gateway meets every fault and then a good request on
the same pool.
"""

from __future__ import annotations

import asyncio
import json
import random
import tracemalloc
from collections.abc import MutableMapping
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from gateway.state import HTTP

from .conftest import Gateway, GatewayFactory, StartUpstream, chat_body

Json = dict[str, Any]


def chunk(content: str, finish: str | None = None) -> bytes:
    delta = {"content": content} if content else {}
    obj = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "mock-gpt",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


EVENTS = [chunk(f"w{i} ") for i in range(12)] + [chunk("", "stop")]
DONE = b"data: [DONE]\n\n"
GOOD = b"".join(EVENTS) + DONE
SSE = {"Content-Type": "text/event-stream"}


async def _sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE)
    await resp.prepare(request)
    return resp


async def fault_handler(request: web.Request) -> web.StreamResponse:
    """Behave as the `x-fault` header says; without one, a good short stream (or JSON)."""
    await request.read()
    fault = request.headers.get("x-fault", "")
    kind, _, arg = fault.partition(":")
    if kind == "stall-headers":
        await asyncio.sleep(float(arg))
    if kind == "non-sse":
        return web.Response(body=b"<html>maintenance</html>", content_type="text/html")
    if kind == "bad-json":
        return web.Response(body=b'{"choices": [tru', content_type="application/json")
    if not (await request.json()).get("stream"):
        return web.json_response(
            {
                "choices": [{"message": {"content": "ok"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )
    resp = await _sse(request)
    if not await write_fault(request, resp, kind, arg, EVENTS):
        await resp.write(GOOD)
        await resp.write_eof()
    return resp


async def write_fault(
    request: web.Request, resp: web.StreamResponse, kind: str, arg: str, events: list[bytes]
) -> bool:
    """The stream fault `kind` (with `arg`) over a stream of `events`: True when it ended the
    response itself (or dropped the connection), False when a good stream is still owed."""
    if kind == "reset":
        # Write the first `arg` bytes of a good stream, then drop the socket (no chunked end).
        await resp.write((b"".join(events) + DONE)[: int(arg)])
        await asyncio.sleep(0.05)  # let the bytes leave before the RST
        assert request.transport is not None
        request.transport.abort()
        return True
    if kind == "stall-chunks":
        await resp.write(events[0])
        await asyncio.sleep(float(arg))
    elif kind == "huge-line":
        block = b"x" * (64 << 10)
        await resp.write(events[0] + b"data: ")
        for _ in range(int(arg) // len(block)):
            await resp.write(block)
        await resp.write(b"\n\n")
    elif kind == "bad-utf8":
        await resp.write(
            events[0] + b'data: {"choices": [{"delta": {"content": "\xff\xfe\xc3"}}]}\n\n'
        )
    elif kind == "bad-json-chunk":
        await resp.write(
            events[0] + b'data: {"choices": [{"delta": \n\n' + b'data: {"usage": {\xff\n\n'
        )
    elif kind == "no-done":
        await resp.write(b"".join(events))
        await resp.write_eof()
        return True
    return False


def fault_app() -> web.Application:
    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/v1/chat/completions", fault_handler)
    return app


@pytest.fixture
async def faulty(start_upstream: StartUpstream, gateway_factory: GatewayFactory) -> Gateway:
    up = await start_upstream(fault_app())
    return await gateway_factory(
        up.url,
        upstreams=[{"first_byte_timeout": 0.5, "idle_timeout": 0.5}],
        retry={"attempts": 1},
    )


async def access_line(logs: list[MutableMapping[str, Any]], n: int = 1) -> MutableMapping[str, Any]:
    """The n-th access line (1-based); it follows the response's end by a few loop turns."""
    for _ in range(300):
        lines = [e for e in logs if e["event"] == "access"]
        if len(lines) >= n:
            return lines[n - 1]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no access line #{n} in {logs}")


def events_of(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), body[-200:]
    return [e + b"\n\n" for e in body[:-2].split(b"\n\n")]


def error_of(event: bytes) -> Json:
    assert event.startswith(b"data: "), event
    err: Json = json.loads(event[6:])["error"]
    assert set(err) == {"message", "type", "code"}
    return err


async def then_serves_normally(
    gw: Gateway, http: aiohttp.ClientSession, logs: list[Any], n: int
) -> None:
    """After the fault: a good stream and a good JSON answer, both logged completed."""
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        assert await resp.read() == GOOD
    assert (await access_line(logs, n + 1))["outcome"] == "completed"
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(stream=False)) as resp:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["message"]["content"] == "ok"
    async with http.get(f"{gw.url}/healthz") as resp:
        assert resp.status == 200


# Seeded: the same six cut points every run, spread over the whole stream (some inside an
# event, some right on a boundary, one before any byte).
_rng = random.Random(9)
RESET_POINTS = sorted(
    {0, len(EVENTS[0]), *(_rng.randrange(1, len(GOOD) - len(DONE)) for _ in range(4))}
)


@pytest.mark.parametrize("cut", RESET_POINTS)
async def test_reset_mid_stream_ends_with_an_error_event_and_no_torn_event(
    faulty: Gateway, http: aiohttp.ClientSession, cut: int
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with http.post(
            f"{faulty.url}/v1/chat/completions",
            json=chat_body(),
            headers={"x-fault": f"reset:{cut}"},
        ) as resp:
            assert resp.status == 200
            body = await resp.read()  # a clean end of the response, no exception
        events = events_of(body)
        # Whole events only: exactly the upstream's complete events before the cut.
        whole = [e for e, end in zip(EVENTS, _ends(), strict=True) if end <= cut]
        assert events[:-1] == whole
        assert error_of(events[-1])["code"] == "upstream_disconnected"
        assert (await access_line(logs))["outcome"] == "upstream_error"
        await then_serves_normally(faulty, http, logs, 1)


def _ends() -> list[int]:
    out, pos = [], 0
    for e in EVENTS:
        pos += len(e)
        out.append(pos)
    return out


async def test_stall_before_headers_is_504_json(
    faulty: Gateway, http: aiohttp.ClientSession
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with http.post(
            f"{faulty.url}/v1/chat/completions",
            json=chat_body(),
            headers={"x-fault": "stall-headers:5"},
        ) as resp:
            assert resp.status == 504
            assert (await resp.json())["error"]["type"] == "timeout"
        line = await access_line(logs)
        assert (line["outcome"], line["status"]) == ("timeout", 504)
        await then_serves_normally(faulty, http, logs, 1)


async def test_stall_between_chunks_ends_with_a_timeout_event(
    faulty: Gateway, http: aiohttp.ClientSession
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with http.post(
            f"{faulty.url}/v1/chat/completions",
            json=chat_body(),
            headers={"x-fault": "stall-chunks:5"},
        ) as resp:
            body = await resp.read()
        events = events_of(body)
        assert events[0] == EVENTS[0]
        assert error_of(events[-1])["type"] == "timeout"
        assert (await access_line(logs))["outcome"] == "timeout"
        await then_serves_normally(faulty, http, logs, 1)


async def test_a_10_mb_event_line_is_cut_off_with_bounded_memory(
    faulty: Gateway, http: aiohttp.ClientSession
) -> None:
    cap = faulty.cfg.sse.max_event_bytes
    with structlog.testing.capture_logs() as logs:
        tracemalloc.start()
        try:
            async with http.post(
                f"{faulty.url}/v1/chat/completions",
                json=chat_body(),
                headers={"x-fault": f"huge-line:{10 << 20}"},
            ) as resp:
                body = await resp.read()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        events = events_of(body)
        assert events[0] == EVENTS[0]
        assert error_of(events[-1])["code"] == "event_too_large"
        assert len(body) < 4096  # none of the oversize event reached the client
        # The splitter held at most its cap (plus a read's worth) before it gave up: the whole
        # process allocated nowhere near the 10 MB the upstream sent.
        assert peak < 4 * cap, (peak, cap)
        assert (await access_line(logs))["outcome"] == "upstream_error"
        await then_serves_normally(faulty, http, logs, 1)


@pytest.mark.parametrize("fault", ["bad-utf8", "bad-json-chunk"])
async def test_invalid_utf8_or_json_in_chunks_is_relayed_verbatim_and_the_stream_completes(
    faulty: Gateway, http: aiohttp.ClientSession, fault: str
) -> None:
    """The relay does not parse chunks (hot path): a broken event reaches the client as the
    upstream wrote it, framed whole, and the stream still ends with [DONE]; the usage tap,
    which does parse a chunk mentioning usage, shrugs off one that is not JSON."""
    with structlog.testing.capture_logs() as logs:
        async with http.post(
            f"{faulty.url}/v1/chat/completions", json=chat_body(), headers={"x-fault": fault}
        ) as resp:
            assert resp.status == 200
            body = await resp.read()
        assert body.endswith(DONE)
        assert (b"\xff\xfe" in body) == (fault == "bad-utf8")
        assert all(e.endswith(b"\n\n") for e in events_of(body))
        line = await access_line(logs)
        assert line["outcome"] == "completed"
        assert not [e for e in logs if e.get("log_level") == "error"]
        await then_serves_normally(faulty, http, logs, 1)


@pytest.mark.parametrize("fault", ["non-sse", "bad-json"])
async def test_200_that_is_not_what_was_asked_for_is_502_json(
    faulty: Gateway, http: aiohttp.ClientSession, fault: str
) -> None:
    stream = fault == "non-sse"
    with structlog.testing.capture_logs() as logs:
        async with http.post(
            f"{faulty.url}/v1/chat/completions",
            json=chat_body(stream=stream),
            headers={"x-fault": fault},
        ) as resp:
            assert resp.status == 502
            assert resp.content_type == "application/json"
            err = (await resp.json())["error"]
        assert (err["type"], err["code"]) == ("upstream_error", "bad_upstream_response")
        line = await access_line(logs)
        assert (line["outcome"], line["status"]) == ("upstream_error", 502)
        await then_serves_normally(faulty, http, logs, 1)


async def test_close_without_done_ends_with_a_truncation_event(
    faulty: Gateway, http: aiohttp.ClientSession
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with http.post(
            f"{faulty.url}/v1/chat/completions", json=chat_body(), headers={"x-fault": "no-done"}
        ) as resp:
            body = await resp.read()
        events = events_of(body)
        assert events[:-1] == EVENTS
        assert error_of(events[-1])["code"] == "stream_truncated"
        assert (await access_line(logs))["outcome"] == "upstream_error"
        await then_serves_normally(faulty, http, logs, 1)


async def test_every_fault_in_a_row_leaves_no_task_and_no_upstream_connection(
    faulty: Gateway, http: aiohttp.ClientSession
) -> None:
    faults = [f"reset:{p}" for p in RESET_POINTS] + [
        "stall-chunks:5",
        "huge-line:2097152",
        "bad-utf8",
        "bad-json-chunk",
        "no-done",
        "non-sse",
    ]
    for fault in faults:
        async with http.post(
            f"{faulty.url}/v1/chat/completions", json=chat_body(), headers={"x-fault": fault}
        ) as resp:
            await resp.read()
    await asyncio.sleep(0.2)
    relay_tasks = [t for t in asyncio.all_tasks() if "relay" in repr(t.get_coro())]
    assert relay_tasks == []
    connector = faulty.app[HTTP].connector
    assert connector is not None
    # Nothing in use; at most one idle keep-alive connection (from the good answers).
    assert not connector._acquired  # the pool has no public in-use count
    assert sum(len(v) for v in connector._conns.values()) <= 1
