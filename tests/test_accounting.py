"""Usage accounting: totals per client match the traffic, disconnects included."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.exchange import Exchange
from gateway.usage import USAGE
from gateway.usage.accounting import Accounting
from gateway.usage.memory import MemoryUsage
from gateway.usage.tap import Usage, UsageTotals

from .conftest import Gateway, GatewayFactory, StartUpstream, chat_body
from .faulty import USAGE as SCRIPTED_USAGE
from .faulty import Faulty, Step
from .test_metrics import scrape, value
from .test_streaming import ENDS, catalogue_app, fault_body


async def usage_of(http: aiohttp.ClientSession, gw: Gateway) -> dict[str, object]:
    async with http.get(f"{gw.url}/v1/usage") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        return dict(await resp.json())


async def test_usage_starts_at_zero(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    assert await usage_of(http, gateway) == {
        "client": "anonymous",
        "requests": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
    }


async def test_usage_totals_match_streamed_and_plain_traffic(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    expected = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    url = f"{gateway.url}/v1/chat/completions"
    for stream in (True, True, False):
        body = (
            chat_body(stream=stream, stream_options={"include_usage": True})
            if stream
            else chat_body(stream=False)
        )
        async with http.post(url, json=body) as resp:
            assert resp.status == 200
            raw = await resp.read()
        if stream:
            usage_line = next(line for line in raw.split(b"\n") if b'"usage":{' in line)
            usage = json.loads(usage_line.removeprefix(b"data: "))["usage"]
        else:
            usage = json.loads(raw)["usage"]
        for k in expected:
            expected[k] += usage[k]
    assert expected["total_tokens"] > 0
    assert await usage_of(http, gateway) == {"client": "anonymous", "requests": 3, **expected}


async def test_usage_is_counted_when_the_client_did_not_ask_for_it(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat_body()) as resp:
        raw = await resp.read()
    assert b'"usage"' not in raw  # stripped from the client's stream...
    totals = await usage_of(http, gateway)
    assert totals["requests"] == 1 and totals["total_tokens"] > 0  # ...and still accounted


async def test_requests_that_reach_no_upstream_are_not_counted(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    up = await start_upstream(Faulty().app())
    gw = await gateway_factory(up.url, upstreams=[{"models": ["llama*"]}])
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 404
    async with http.post(
        f"{gw.url}/v1/chat/completions", data=b"{", headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
    assert (await usage_of(http, gw))["requests"] == 0


async def test_failed_upstream_requests_count_as_requests_without_tokens(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    up = await start_upstream(Faulty([Step(500)]).app())
    gw = await gateway_factory(up.url, retry={"attempts": 1})
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body(stream=False)) as resp:
        assert resp.status == 500
    totals = await usage_of(http, gw)
    assert (totals["requests"], totals["total_tokens"]) == (1, 0)


async def test_stream_cut_by_client_disconnect_is_recorded_with_deltas_relayed(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    closed = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(3):
                chunk = {"choices": [{"index": 0, "delta": {"content": f"w{i}"}}]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.Event().wait()  # then silence, until the gateway hangs up
        except (asyncio.CancelledError, ConnectionError):
            closed.set()
            raise
        return resp

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/v1/chat/completions", endless)
    up = await start_upstream(app)
    gw = await gateway_factory(up.url)
    async with aiohttp.ClientSession() as own:
        resp = await own.post(f"{gw.url}/v1/chat/completions", json=chat_body())
        for _ in range(3):
            assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
        resp.close()
    await asyncio.wait_for(closed.wait(), 5)
    async with asyncio.timeout(5):
        while (totals := await usage_of(http, gw))["requests"] == 0:
            await asyncio.sleep(0.01)  # the gateway finishes its side just after the upstream's
    assert totals == {
        "client": "anonymous",
        "requests": 1,
        "prompt_tokens": 0,
        "completion_tokens": 3,
        "total_tokens": 3,
    }


async def test_memory_usage_adds_requests_and_tokens_per_client() -> None:
    store = MemoryUsage()
    await store.record("a", Usage(5, 2, 7), streamed=True)
    await store.record("a", None, streamed=False)
    await store.record("b", Usage(1, 1, 2), streamed=False)
    assert await store.totals("a") == UsageTotals(2, 5, 2, 7)
    assert await store.totals("b") == UsageTotals(1, 1, 1, 2)
    assert await store.totals("nobody") == UsageTotals()
    assert store.streamed_requests("a") == 1
    (await store.totals("a")).requests = 99  # a copy: the store is not changed through it
    assert (await store.totals("a")).requests == 2


class SlowStore:
    """A store whose writes take a round trip, like Redis."""

    def __init__(self) -> None:
        self.memory = MemoryUsage()

    async def record(self, client: str, usage: Usage | None, *, streamed: bool) -> None:
        await asyncio.sleep(0.01)
        self.memory.add(client, usage, streamed=streamed)

    async def totals(self, client: str) -> UsageTotals:
        return await self.memory.totals(client)


async def test_accounting_records_from_its_own_task_even_when_the_handler_is_cancelled() -> None:
    app = web.Application()
    store = app[USAGE] = SlowStore()
    accounting = Accounting()
    request = make_mocked_request("POST", "/v1/chat/completions", app=app)
    ex = Exchange("r", "t" * 32, "s" * 16, "01", 0.0, client="c", stream=True, upstream="u")
    ex.usage = Usage(**SCRIPTED_USAGE)

    async def handler() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ex.outcome = "client_disconnected"
            accounting.finished(request, ex, 1.0)  # what the tracing middleware does
            raise

    task = asyncio.ensure_future(handler())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert accounting.pending == 1
    drain = accounting.drain(app)
    await anext(drain)
    await anext(drain, None)  # shutdown waits for the pending record
    assert accounting.pending == 0
    assert await store.totals("c") == UsageTotals(1, 7, 3, 10)


async def test_usage_and_tokens_total_agree_after_a_mixed_run(
    start_upstream: StartUpstream, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """Relayed streams, JSON, detached streams, a stream cut by the upstream on each route,
    and a client that leaves: /v1/usage and gateway_tokens_total count the same tokens,
    and the estimates count events, not the bytes `data:` inside their content."""
    up = await start_upstream(catalogue_app())
    gw = await gateway_factory(up.url, retry={"attempts": 1})
    cut = f"reset:{ENDS[2] + 30}"  # three whole events (with `data:` in their text), then RST
    for fault, stream in (("good", True), ("good", False), (cut, True)):
        async with http.post(f"{gw.url}/v1/chat/completions", json=fault_body(fault, stream)) as r:
            assert r.status == 200
            await r.read()
    for fault in ("good", cut):
        async with http.post(f"{gw.url}/v1/streams", json=fault_body(fault)) as r:
            url = (await r.json())["url"]
        async with http.get(gw.url + url) as r:
            await r.read()
    async with aiohttp.ClientSession() as own:  # the client that leaves after three events
        resp = await own.post(f"{gw.url}/v1/chat/completions", json=fault_body("hang"))
        for _ in range(3):
            assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
        resp.close()
    async with asyncio.timeout(5):
        while (totals := await usage_of(http, gw))["requests"] < 6:
            await asyncio.sleep(0.01)  # the generations and the cut stream end just after
    # good x3 (5 + 6 each); three cut after three events: 3 estimated completion tokens each.
    assert totals == {
        "client": "anonymous",
        "requests": 6,
        "prompt_tokens": 15,
        "completion_tokens": 27,
        "total_tokens": 42,
    }
    samples = await scrape(http, gw)
    tokens = {
        kind: value(samples, "gateway_tokens_total", client="anonymous", kind=kind)
        for kind in ("prompt", "completion")
    }
    assert tokens == {"prompt": 15, "completion": 27}
