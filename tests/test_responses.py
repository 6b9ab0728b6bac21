"""Background responses (/v1/responses with "background": true) through a real gateway
process, with the official openai SDK unchanged, against the bundled mock upstream (and, for
the Redis backend, two gateway processes sharing a real Redis)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from gateway.app import create_app
from gateway.exchange import Exchange
from gateway.mock_upstream import MockSettings, create_mock_app, reply_pieces
from gateway.process.server import start
from gateway.responses import objects, pump
from gateway.streams.log import EVENT_LOG
from gateway.streams.registry import STREAM_TASKS
from gateway.usage import USAGE
from tests.conftest import (
    TEST_KEY,
    TEST_KEY_SHA,
    UPSTREAM_KEY,
    GatewayFactory,
    StartUpstream,
    Upstream,
    make_config,
)
from tests.gates import until
from tests.gateway_process import GatewayProcess
from tests.killable import ServeProcess, config_text
from tests.redis_server import redis_limits
from tests.test_metrics import scrape, value

PROMPT = "hello there"
OTHER_KEY = "gw-other-key-0123456789abcdefghijklmnopqrstuvwxyz"
KEYS = [
    {"client": "tester", "sha256": TEST_KEY_SHA, "rpm": 0},
    {"client": "other", "sha256": hashlib.sha256(OTHER_KEY.encode()).hexdigest(), "rpm": 0},
]


def sdk(gw: GatewayProcess, key: str = TEST_KEY) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)


async def start_gateway(
    serve_process: ServeProcess, up: Upstream, **sections: Any
) -> GatewayProcess:
    sections.setdefault("limits", {"per_ip_rpm": 0})
    return await serve_process(config_text(up.url, keys=sections.pop("keys", KEYS), **sections))


@pytest.fixture
async def slow(start_upstream: StartUpstream) -> Upstream:
    """20 words 0.05 s apart: a stream of about a second and a half."""
    return await start_upstream(create_mock_app(MockSettings(chunks=20, delay=0.05)))


@pytest.fixture
async def endless(start_upstream: StartUpstream) -> Upstream:
    """A stream far longer than any test: only a cancel ends it."""
    return await start_upstream(create_mock_app(MockSettings(chunks=2000, delay=0.05)))


@pytest.fixture
async def clients() -> AsyncIterator[list[AsyncOpenAI]]:
    made: list[AsyncOpenAI] = []
    yield made
    for c in made:
        await c.close()


def texts(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def read_until(stream: Any, seq: int) -> list[Any]:
    got = []
    async for event in stream:
        got.append(event)
        if event.sequence_number == seq:
            break
    await stream.close()  # dropped mid-generation, as by a lost connection
    return got


async def drop_then_resume(a: AsyncOpenAI, b: AsyncOpenAI) -> tuple[str, list[Any]]:
    """Create on `a` with stream=True, drop after sequence number 5, resume on `b`."""
    stream = await a.responses.create(
        model="mock-gpt", input=PROMPT, background=True, stream=True
    )
    first = await read_until(stream, 5)
    response_id = first[0].response.id
    rest = [e async for e in await b.responses.retrieve(response_id, stream=True, starting_after=5)]
    return response_id, first + rest


async def test_a_dropped_background_stream_resumes_without_gap_or_duplicate(
    serve_process: ServeProcess, slow: Upstream, clients: list[AsyncOpenAI]
) -> None:
    gw = await start_gateway(serve_process, slow)
    client = sdk(gw)
    clients.append(client)
    response_id, events = await drop_then_resume(client, client)

    assert response_id.startswith("resp_") and len(response_id) > 40
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert texts(events) == "".join(reply_pieces(PROMPT, 20, 1))
    assert slow.state.requests["/v1/responses"] == 1  # generated once
    sent = slow.state.last_body
    assert sent is not None and sent["stream"] is True and "background" not in sent

    done = await client.responses.retrieve(response_id)
    assert done.id == response_id and done.status == "completed" and done.background is True
    assert done.output_text == "".join(reply_pieces(PROMPT, 20, 1))
    assert done.usage is not None and done.usage.output_tokens == 20
    assert done.usage.input_tokens == 2


async def test_create_answers_at_once_and_retrieve_follows_it_to_completed(
    serve_process: ServeProcess, slow: Upstream, clients: list[AsyncOpenAI]
) -> None:
    gw = await start_gateway(serve_process, slow)
    client = sdk(gw)
    clients.append(client)
    started = time.monotonic()
    created = await client.responses.create(model="mock-gpt", input=PROMPT, background=True)
    assert time.monotonic() - started < 1.0  # the generation takes about 1.5 s
    assert created.object == "response" and created.background is True
    assert created.status in ("queued", "in_progress") and created.model == "mock-gpt"
    # From the first event, without starting_after.
    events = [e async for e in await client.responses.retrieve(created.id, stream=True)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert texts(events) == "".join(reply_pieces(PROMPT, 20, 1))
    assert (await client.responses.retrieve(created.id)).status == "completed"
    # Charged to the client's usage like any generation.
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {TEST_KEY}"}
        async with http.get(gw.url + "/v1/usage", headers=headers) as r:
            usage = await r.json()
    assert usage["completion_tokens"] == 20 and usage["prompt_tokens"] == 2


async def test_cancel_stops_the_upstream_within_a_second_and_is_idempotent(
    serve_process: ServeProcess, endless: Upstream, clients: list[AsyncOpenAI]
) -> None:
    gw = await start_gateway(serve_process, endless)
    client = sdk(gw)
    clients.append(client)
    created = await client.responses.create(model="mock-gpt", input=PROMPT, background=True)
    stream = await client.responses.retrieve(created.id, stream=True)
    await read_until(stream, 8)  # generating
    assert endless.state.open_streams == 1
    started = time.monotonic()
    cancelled = await client.responses.cancel(created.id)
    assert cancelled.status == "cancelled" and cancelled.id == created.id
    await asyncio.wait_for(endless.state.client_disconnected.wait(), 5)
    assert time.monotonic() - started < 1.0
    assert endless.state.completed_streams == 0
    again = await client.responses.cancel(created.id)
    assert again.status == "cancelled"
    assert (await client.responses.retrieve(created.id)).status == "cancelled"
    # A reader after the cancel gets what was generated, then the end.
    events = [e async for e in await client.responses.retrieve(created.id, stream=True)]
    assert events and events[-1].type == "response.output_text.delta"


async def test_another_client_gets_404_for_every_route(
    serve_process: ServeProcess, slow: Upstream, clients: list[AsyncOpenAI]
) -> None:
    gw = await start_gateway(serve_process, slow)
    owner, other = sdk(gw), sdk(gw, OTHER_KEY)
    clients += [owner, other]
    created = await owner.responses.create(model="mock-gpt", input=PROMPT, background=True)
    with pytest.raises(openai.NotFoundError):
        await other.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await other.responses.retrieve(created.id, stream=True)
    with pytest.raises(openai.NotFoundError):
        await other.responses.cancel(created.id)
    with pytest.raises(openai.NotFoundError):
        await other.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await owner.responses.retrieve("resp_" + "0" * 48)  # unknown: the very same answer
    assert (await owner.responses.retrieve(created.id)).status == "in_progress"


async def test_delete_forgets_it(
    serve_process: ServeProcess, slow: Upstream, clients: list[AsyncOpenAI]
) -> None:
    gw = await start_gateway(serve_process, slow)
    client = sdk(gw)
    clients.append(client)
    created = await client.responses.create(model="mock-gpt", input=PROMPT, background=True)
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {TEST_KEY}"}
        async with http.delete(f"{gw.url}/v1/responses/{created.id}", headers=headers) as r:
            assert r.status == 200
            assert await r.json() == {
                "id": created.id, "object": "response.deleted", "deleted": True
            }
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    await asyncio.wait_for(slow.state.client_disconnected.wait(), 5)  # and it stopped


async def test_after_the_retention_it_is_404(
    serve_process: ServeProcess, start_upstream: StartUpstream, clients: list[AsyncOpenAI]
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=3, delay=0.0)))
    gw = await start_gateway(serve_process, up, sse={"resume_ttl": 1.0})
    client = sdk(gw)
    clients.append(client)
    created = await client.responses.create(model="mock-gpt", input=PROMPT, background=True)
    [e async for e in await client.responses.retrieve(created.id, stream=True)]
    assert (await client.responses.retrieve(created.id)).status == "completed"
    ended = time.monotonic()
    for _ in range(100):  # bounded: gone within the ttl and a bit
        try:
            await client.responses.retrieve(created.id)
        except openai.NotFoundError:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("still there long after resume_ttl")
    assert time.monotonic() - ended > 0.5  # kept for a while, not dropped at once


async def test_it_holds_a_concurrency_slot_until_it_ends(
    serve_process: ServeProcess, endless: Upstream, clients: list[AsyncOpenAI]
) -> None:
    keys = [{**KEYS[0], "max_concurrent": 1}]
    gw = await start_gateway(serve_process, endless, keys=keys)
    client = sdk(gw)
    clients.append(client)
    created = await client.responses.create(model="mock-gpt", input=PROMPT, background=True)
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model="mock-gpt", input=PROMPT, background=True)
    # Following and cancelling it need no slot of their own: the client is at its limit.
    await read_until(await client.responses.retrieve(created.id, stream=True), 3)
    await client.responses.cancel(created.id)
    for _ in range(50):  # the generation gives its slot back as it ends
        try:
            again = await client.responses.create(
                model="mock-gpt", input=PROMPT, background=True
            )
            break
        except openai.RateLimitError:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the slot was never given back")
    await client.responses.cancel(again.id)


async def test_an_upstream_failing_midway_ends_with_response_failed(
    serve_process: ServeProcess, slow: Upstream, clients: list[AsyncOpenAI]
) -> None:
    gw = await start_gateway(serve_process, slow)
    client = sdk(gw)
    clients.append(client)
    stream = await client.responses.create(
        model="mock-gpt", input=PROMPT, background=True, stream=True,
        extra_headers={"x-mock-fail-after": "8"},
    )
    events = [e async for e in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    last = events[-1]
    assert last.type == "response.failed"
    assert last.response.status == "failed" and last.response.error is not None
    assert last.response.error.code == "upstream_disconnected"
    shown = await client.responses.retrieve(last.response.id)
    assert shown.status == "failed" and shown.error is not None


async def test_an_upstream_without_responses_is_a_clear_error_at_creation(
    serve_process: ServeProcess, start_upstream: StartUpstream, clients: list[AsyncOpenAI]
) -> None:
    up = await start_upstream(web.Application())  # answers 404 to everything
    gw = await start_gateway(serve_process, up)
    client = sdk(gw)
    clients.append(client)
    with pytest.raises(openai.APIStatusError) as err:
        await asyncio.wait_for(
            client.responses.create(model="mock-gpt", input=PROMPT, background=True), 10
        )
    assert err.value.status_code == 502
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "responses_unsupported"


async def test_an_upstream_refusal_is_relayed_at_creation(
    serve_process: ServeProcess, slow: Upstream, clients: list[AsyncOpenAI]
) -> None:
    gw = await start_gateway(serve_process, slow)
    client = sdk(gw)
    clients.append(client)
    with pytest.raises(openai.BadRequestError) as err:
        await client.responses.create(
            model="mock-gpt", input=PROMPT, background=True,
            extra_headers={"x-mock-status": "400"},
        )
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "mock_fault"


async def test_without_background_it_is_relayed_as_before(
    serve_process: ServeProcess, slow: Upstream, clients: list[AsyncOpenAI]
) -> None:
    gw = await start_gateway(serve_process, slow)
    client = sdk(gw)
    clients.append(client)
    plain = await client.responses.create(model="mock-gpt", input=PROMPT)
    assert plain.id.startswith("resp_mock") and plain.status == "completed"
    assert plain.background is None


async def test_bad_starting_after_is_400(
    serve_process: ServeProcess, slow: Upstream, clients: list[AsyncOpenAI]
) -> None:
    gw = await start_gateway(serve_process, slow)
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {TEST_KEY}"}
        url = f"{gw.url}/v1/responses/resp_{'0' * 48}?stream=true&starting_after=-1"
        async with http.get(url, headers=headers) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "invalid_starting_after"


async def test_on_redis_created_on_one_instance_resumed_and_cancelled_on_another(
    serve_process: ServeProcess, slow: Upstream, endless: Upstream, redis_url: str,
    clients: list[AsyncOpenAI],
) -> None:
    limits = redis_limits(redis_url, lease_ttl=30)  # no help from polling: pub/sub only
    a = await start_gateway(serve_process, slow, limits=limits)
    b = await start_gateway(serve_process, slow, limits=limits)
    on_a, on_b, other_on_b = sdk(a), sdk(b), sdk(b, OTHER_KEY)
    clients += [on_a, on_b, other_on_b]

    response_id, events = await drop_then_resume(on_a, on_b)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert texts(events) == "".join(reply_pieces(PROMPT, 20, 1))
    done = await on_b.responses.retrieve(response_id)
    assert done.status == "completed" and done.usage is not None
    with pytest.raises(openai.NotFoundError):
        await other_on_b.responses.retrieve(response_id)

    c = await start_gateway(serve_process, endless, limits=limits)
    d = await start_gateway(serve_process, endless, limits=limits)
    on_c, on_d = sdk(c), sdk(d)
    clients += [on_c, on_d]
    created = await on_c.responses.create(model="mock-gpt", input=PROMPT, background=True)
    await read_until(await on_d.responses.retrieve(created.id, stream=True), 5)
    started = time.monotonic()
    assert (await on_d.responses.cancel(created.id)).status == "cancelled"
    await asyncio.wait_for(endless.state.client_disconnected.wait(), 5)
    assert time.monotonic() - started < 1.0
    assert (await on_c.responses.retrieve(created.id)).status == "cancelled"
    await on_d.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await on_c.responses.retrieve(created.id)


async def test_its_tokens_count_in_tokens_total_as_in_v1_usage(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # gateway_tokens_total agrees with /v1/usage (the contract), for a generation the app
    # owns as for a relayed request: a background response's tokens are in both.
    gw = await gateway_factory(upstream.url, auth={"mode": "keys"}, keys=KEYS)
    headers = {"Authorization": f"Bearer {TEST_KEY}"}
    body = {"model": "mock-gpt", "input": PROMPT, "background": True}
    async with http.post(gw.url + "/v1/responses", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        response_id = (await r.json())["id"]
    await until(lambda: len(gw.app[STREAM_TASKS]) == 0)
    async with http.get(f"{gw.url}/v1/responses/{response_id}", headers=headers) as r:
        assert (await r.json())["status"] == "completed"
    async with http.get(gw.url + "/v1/usage", headers=headers) as r:
        usage = await r.json()
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] == 2
    m = await scrape(http, gw)
    assert value(m, "gateway_tokens_total", client="tester", kind="completion") == 5
    assert value(m, "gateway_tokens_total", client="tester", kind="prompt") == 2


async def test_a_streamed_create_refused_for_want_of_a_reader_starts_nothing(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, http: aiohttp.ClientSession
) -> None:
    # With the instance's readers at their cap, a create with "stream": true is refused 503;
    # it must then start no generation: one would run (and be charged) for a client that
    # never learnt its id.
    up = await start_upstream(create_mock_app(MockSettings(chunks=300, delay=0.02)))
    gw = await gateway_factory(
        up.url, auth={"mode": "keys"}, keys=KEYS, sse={"max_followers": 1}
    )
    headers = {"Authorization": f"Bearer {TEST_KEY}"}
    body = {"model": "mock-gpt", "input": PROMPT, "background": True}
    async with http.post(gw.url + "/v1/responses", json=body, headers=headers) as r:
        response_id = (await r.json())["id"]
    url = f"{gw.url}/v1/responses/{response_id}?stream=true"
    async with http.get(url, headers=headers) as reader:  # the one reader allowed
        assert reader.status == 200
        assert await reader.content.readline()
        async with http.post(
            gw.url + "/v1/responses", json={**body, "stream": True}, headers=headers
        ) as r:
            assert r.status == 503, await r.text()
            assert (await r.json())["error"]["code"] == "too_many_followers"
        assert up.state.requests["/v1/responses"] == 1
        assert len(gw.app[STREAM_TASKS]) == 1
    async with http.post(f"{gw.url}/v1/responses/{response_id}/cancel", headers=headers) as r:
        assert r.status == 200


class _Slot:
    def __init__(self) -> None:
        self.released = 0

    def detach(self) -> None:
        pass

    async def release(self) -> None:
        self.released += 1


async def test_a_generation_cancelled_before_its_first_step_still_ends_and_gives_back(
    gateway_factory: GatewayFactory, endless: Upstream
) -> None:
    """The drain's deadline (`cancel_all`) can come in the loop turn a create handed its
    generation over: a task cancelled before its first step never runs its body, so nothing
    closed the upstream, gave the slot back or ended the log."""
    gw = await gateway_factory(endless.url)
    app = gw.app
    rid = "resp_" + "ab" * 24
    base = objects.created(rid, {"model": "mock-gpt", "input": PROMPT}, int(time.time()))
    await app[EVENT_LOG].create(rid)
    assert await app[EVENT_LOG].append(rid, objects.META, objects.meta("anonymous", base))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            endless.url + "/responses",
            json={"model": "mock-gpt", "input": PROMPT, "stream": True},
            headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
        )
        assert resp.status == 200
        ex = Exchange("req", "0" * 32, "1" * 16, "01", 0.0, model="mock-gpt", stream=True)
        slot = _Slot()
        job = pump.Job(rid, "anonymous", None, base, ex, resp, slot)
        app[STREAM_TASKS].start(pump.run(app, job), name="response:test")
        await app[STREAM_TASKS].cancel_all()  # in the same turn: before its first step
        assert slot.released == 1
        assert resp.connection is None  # closed or released: the upstream is not held
        await asyncio.wait_for(endless.state.client_disconnected.wait(), 5)
        batch = await app[EVENT_LOG].read(rid, 1, timeout=0, limit=100)
        assert batch is not None and batch.ended
        last = batch.events[-1]
        assert last.kind == "fail"
        failed = orjson.loads(last.data)
        assert failed["type"] == "response.failed"
        assert failed["response"]["error"]["code"] == "shutdown"


class _SlowUsage:
    """A usage store as slow as a Redis under load: `record` waits for `gate`."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.records: list[tuple[str, Any]] = []

    async def record(self, client: str, usage: Any, *, streamed: bool) -> None:
        self.entered.set()
        await self.gate.wait()
        self.records.append((client, usage))


async def test_a_generation_stopped_while_it_settles_still_gives_back_and_charges(
    upstream: Upstream,
) -> None:
    """The app's stop (or the drain's deadline) cancels a generation that may already be
    settling (its slot, the usage store, tpm: each a Redis round trip): the cancel cut the
    settling short, and what it cost was never recorded."""
    usage = _SlowUsage()

    async def slow_usage(app: web.Application) -> None:
        app[USAGE] = usage  # after the backends installed theirs

    app = create_app(make_config(upstream.url))
    app.on_startup.append(slow_usage)
    runner, _ = await start(app, "127.0.0.1", 0, shutdown_timeout=2)
    try:
        rid = "resp_" + "cd" * 24
        base = objects.created(rid, {"model": "mock-gpt", "input": PROMPT}, int(time.time()))
        await app[EVENT_LOG].create(rid)
        assert await app[EVENT_LOG].append(rid, objects.META, objects.meta("anonymous", base))
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                upstream.url + "/responses",
                json={"model": "mock-gpt", "input": PROMPT, "stream": True},
                headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
            )
            assert resp.status == 200
            ex = Exchange("req", "0" * 32, "1" * 16, "01", 0.0, model="mock-gpt", stream=True)
            job = pump.Job(rid, "anonymous", None, base, ex, resp, None)
            task = app[STREAM_TASKS].start(pump.run(app, job), name="response:test")
            await asyncio.wait_for(usage.entered.wait(), 10)  # completed: now settling
            stopping = asyncio.ensure_future(app[STREAM_TASKS].cancel_all())
            await until(lambda: task.cancelling() > 0)
            usage.gate.set()  # the slow store answers
            await asyncio.wait_for(stopping, 10)
            assert len(usage.records) == 1 and usage.records[0][1] is not None
    finally:
        await runner.cleanup()
