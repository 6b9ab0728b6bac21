"""One streaming core: a faulty upstream replayed through /v1/chat/completions (events go to
the client's response) and through /v1/streams (events go to the event log) ends the same
way on both: the same outcome, the same text, the same final error and the same usage.

The catalogue is test_faults.py's (resets at several points, a stall between chunks, invalid
UTF-8, invalid JSON, a close without [DONE], an over-long event) plus the last event without
its trailing blank line. The fault is named in the prompt, so the upstream sees it whichever
route the gateway came by, and whatever headers the gateway forwards.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from gateway.streaming import data_events

from .conftest import Gateway, GatewayFactory, StartUpstream
from .test_faults import DONE, SSE, chunk, write_fault

USAGE = {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
USAGE_EVENT = b"data: " + json.dumps({"choices": [], "usage": USAGE}).encode() + b"\n\n"
# Content that holds the bytes `data:` must not count as extra events.
WORDS = ["w0 ", "data: w1 ", "w2 data:data: ", "w3 ", "w4 ", "w5"]
EVENTS = [chunk(w) for w in WORDS] + [chunk("", "stop"), USAGE_EVENT]
GOOD = b"".join(EVENTS) + DONE


def _ends() -> list[int]:
    out, pos = [], 0
    for e in EVENTS:
        pos += len(e)
        out.append(pos)
    return out


ENDS = _ends()


async def catalogue(request: web.Request) -> web.StreamResponse:
    """A good stream, or the fault that the last message names (`fault kind:arg`)."""
    body = await request.json()
    fault = body["messages"][-1]["content"].removeprefix("fault ")
    kind, _, arg = fault.partition(":")
    if not body.get("stream"):
        return web.json_response({"choices": [{"message": {"content": "ok"}}], "usage": USAGE})
    resp = web.StreamResponse(headers=SSE)
    await resp.prepare(request)
    if kind == "hang":  # three events, then silence until the gateway hangs up
        await resp.write(b"".join(EVENTS[:3]))
        await asyncio.Event().wait()
    elif kind == "no-blank":  # [DONE] as the last event, without its blank line
        await resp.write(GOOD.removesuffix(b"\n\n"))
        await resp.write_eof()
        return resp
    elif kind == "tail-no-blank":  # a content event without its blank line, then the close
        await resp.write(b"".join(EVENTS[:3]) + chunk("tail").removesuffix(b"\n\n"))
        await resp.write_eof()
        return resp
    elif await write_fault(request, resp, kind, arg, EVENTS):
        return resp
    await resp.write(GOOD)
    await resp.write_eof()
    return resp


def catalogue_app() -> web.Application:
    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/v1/chat/completions", catalogue)
    return app


@pytest.fixture
async def gw(start_upstream: StartUpstream, gateway_factory: GatewayFactory) -> Gateway:
    up = await start_upstream(catalogue_app())
    return await gateway_factory(
        up.url,
        upstreams=[{"first_byte_timeout": 2.0, "idle_timeout": 0.5}],
        retry={"attempts": 1},
    )


@dataclass(frozen=True)
class Ending:
    """How one stream ended, as its reader and the accounting saw it."""

    outcome: str  # access line (relay) / stream_ended line (detached)
    text: str  # the content deltas, joined
    error: str | None  # the final error's code, None when it finished
    tokens: tuple[int, int]  # (prompt, completion) added to /v1/usage


def _content(data: bytes | str) -> str:
    """A delta's content as a reader sees it: invalid UTF-8 decoded with replacement (as
    EventSource does), a chunk that is not JSON skipped."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    try:
        obj = json.loads(text)
    except ValueError:
        return ""
    if not isinstance(obj, dict):
        return ""
    choices = obj.get("choices") or [{}]
    return str((choices[0].get("delta") or {}).get("content") or "")


async def _totals(http: aiohttp.ClientSession, gw: Gateway) -> tuple[int, int, int]:
    async with http.get(f"{gw.url}/v1/usage") as resp:
        t = await resp.json()
    return t["requests"], t["prompt_tokens"], t["completion_tokens"]


async def _usage(
    http: aiohttp.ClientSession, gw: Gateway, before: tuple[int, int, int]
) -> tuple[int, int]:
    """The tokens one more request added to /v1/usage since `before`, once recorded."""
    async with asyncio.timeout(5):
        while (now := await _totals(http, gw))[0] == before[0]:
            await asyncio.sleep(0.01)
    assert now[0] == before[0] + 1
    return now[1] - before[1], now[2] - before[2]


async def _line(logs: list[Any], event: str) -> Any:
    async with asyncio.timeout(5):
        while not (lines := [e for e in logs if e["event"] == event]):
            await asyncio.sleep(0.01)
    assert len(lines) == 1, lines
    return lines[0]


def fault_body(fault: str, stream: bool = True) -> dict[str, Any]:
    return {
        "model": "mock-gpt",
        "messages": [{"role": "user", "content": f"fault {fault}"}],
        "stream": stream,
    }


async def relayed(http: aiohttp.ClientSession, gw: Gateway, fault: str) -> Ending:
    before = await _totals(http, gw)
    with structlog.testing.capture_logs() as logs:
        async with http.post(f"{gw.url}/v1/chat/completions", json=fault_body(fault)) as resp:
            assert resp.status == 200
            body = await resp.read()  # a clean end, whatever the fault
        line = await _line(logs, "access")
    assert body.endswith(b"\n\n"), body[-100:]
    datas = [e.removeprefix(b"data: ") for e in body[:-2].split(b"\n\n")]
    error = None
    if datas and datas[-1].startswith(b'{"error"'):
        error = json.loads(datas.pop())["error"]["code"]
    text = "".join(_content(d) for d in datas if d != b"[DONE]")
    assert (line["prompt_tokens"] or 0, line["completion_tokens"] or 0) == (
        tokens := await _usage(http, gw, before)
    )
    return Ending(line["outcome"], text, error, tokens)


async def detached(http: aiohttp.ClientSession, gw: Gateway, fault: str) -> Ending:
    before = await _totals(http, gw)
    with structlog.testing.capture_logs() as logs:
        async with http.post(f"{gw.url}/v1/streams", json=fault_body(fault)) as resp:
            assert resp.status == 201
            url = (await resp.json())["url"]
        async with http.get(gw.url + url) as resp:
            assert resp.status == 200
            body = await resp.read()
        line = await _line(logs, "stream_ended")
    events: list[tuple[str, str]] = []
    for raw in body.split(b"\n\n"):
        fields = dict(
            ln.split(": ", 1) for ln in raw.decode().split("\n") if ln and not ln.startswith(":")
        )
        if "event" in fields:
            events.append((fields["event"], fields["data"]))
    kind, data = events[-1]
    assert kind in ("done", "fail"), events
    error = json.loads(data)["error"]["code"] if kind == "fail" else None
    text = "".join(json.loads(d).get("content") or "" for k, d in events if k == "delta")
    tokens = await _usage(http, gw, before)
    return Ending(line["stream_outcome"], text, error, tokens)


def _text(n_events: int) -> str:
    return "".join(WORDS[:n_events])


def _cut(cut: int) -> tuple[str, str | None, tuple[int, int], str]:
    whole = sum(1 for end in ENDS if end <= cut)
    if whole == len(EVENTS):  # the usage chunk came: the upstream's own count
        return "upstream_error", "upstream_disconnected", (5, 6), _text(6)
    # Cut before usage: the data events relayed, about a token each.
    return "upstream_error", "upstream_disconnected", (0, whole), _text(whole)


FULL = _text(6)
# fault -> (outcome, final error code, (prompt, completion) tokens, text)
CATALOGUE: dict[str, tuple[str, str | None, tuple[int, int], str]] = {
    "good": ("completed", None, (5, 6), FULL),
    **{
        f"reset:{cut}": _cut(cut)
        for cut in (0, 20, ENDS[0], ENDS[2] + 30, ENDS[-2], ENDS[-1], ENDS[-1] + 5)
    },
    "stall-chunks:5": ("timeout", "upstream_timeout", (0, 1), _text(1)),
    "bad-utf8": ("completed", None, (5, 6), "w0 \ufffd\ufffd\ufffd" + FULL),
    "bad-json-chunk": ("completed", None, (5, 6), "w0 " + FULL),
    "no-done": ("upstream_error", "stream_truncated", (5, 6), FULL),
    "no-blank": ("completed", None, (5, 6), FULL),
    "tail-no-blank": ("upstream_error", "stream_truncated", (0, 4), _text(3) + "tail"),
    f"huge-line:{2 << 20}": ("upstream_error", "event_too_large", (0, 1), _text(1)),
}


@pytest.mark.parametrize("fault", list(CATALOGUE))
async def test_the_fault_catalogue_ends_alike_through_the_relay_and_a_detached_stream(
    gw: Gateway, http: aiohttp.ClientSession, fault: str
) -> None:
    outcome, error, tokens, text = CATALOGUE[fault]
    expected = Ending(outcome, text, error, tokens)
    relay = await relayed(http, gw, fault)
    stream = await detached(http, gw, fault)
    assert (relay, stream) == (expected, expected)


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"], ids=["LF", "CR", "CRLF"])
def test_data_events_counts_data_fields_at_line_starts_not_the_bytes_in_content(
    eol: bytes,
) -> None:
    block = (
        b'data: {"choices":[{"delta":{"content":"data: data:"}}]}' + eol + eol
        + b": data: a comment" + eol + eol
        + b"event: x" + eol + b'data:{"c":"\\ndata: y"}' + eol + eol
        + b"data: [DONE]" + eol + eol
    )
    assert data_events(block) == 3
    assert data_events(b"") == 0
