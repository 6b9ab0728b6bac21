"""The Redis event log against a real redis-server: two instances (own connections) share
detached streams; ids, blocking reads, bounds, cancellation and a dead owner."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.redisconn import RedisConnection, RedisUnavailable
from gateway.streams import MemoryEventLog
from gateway.streams.redis import RedisEventLog

from .redis_server import RedisServer

MakeLog = Callable[..., Awaitable[RedisEventLog]]


@pytest.fixture
async def make_log(redis_url: str) -> AsyncIterator[MakeLog]:
    made: list[tuple[RedisConnection, RedisEventLog]] = []

    async def go(
        *, max_events: int = 100, max_bytes: int = 1 << 20, ttl: float = 60, lease_ttl: float = 5
    ) -> RedisEventLog:
        conn = RedisConnection(redis_url, interval=0.1, block_timeout=lease_ttl)
        await conn.start()
        log = RedisEventLog(
            conn, max_events=max_events, max_bytes=max_bytes, ttl=ttl, lease_ttl=lease_ttl
        )
        log.start()
        made.append((conn, log))
        return log

    yield go
    for conn, log in made:
        await log.close()
        await conn.close()


async def test_events_written_on_one_instance_are_read_after_n_on_another(
    make_log: MakeLog,
) -> None:
    a, b = await make_log(), await make_log()
    await a.create("s1")
    ids = [await a.append("s1", "delta", json.dumps({"content": c})) for c in "abc"]
    assert ids == [1, 2, 3]
    batch = await b.read("s1", 0, timeout=0)
    assert batch is not None and not batch.ended
    assert [(e.id, e.kind, json.loads(e.data)["content"]) for e in batch.events] == [
        (1, "delta", "a"),
        (2, "delta", "b"),
        (3, "delta", "c"),
    ]
    after2 = await b.read("s1", 2, timeout=0)
    assert after2 is not None and [e.id for e in after2.events] == [3]
    limited = await b.read("s1", 0, timeout=0, limit=2)
    assert limited is not None and [e.id for e in limited.events] == [1, 2]


async def test_a_blocked_reader_wakes_on_the_next_append(make_log: MakeLog) -> None:
    a, b = await make_log(), await make_log()
    await a.create("s1")
    reader = asyncio.create_task(b.read("s1", 0, timeout=10))
    await asyncio.sleep(0.2)
    assert not reader.done()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await a.append("s1", "delta", '{"content":"x"}')
    batch = await asyncio.wait_for(reader, 5)
    assert loop.time() - t0 < 1.0
    assert batch is not None and [e.id for e in batch.events] == [1]


async def test_an_empty_read_waits_its_timeout_then_says_nothing_yet(make_log: MakeLog) -> None:
    a = await make_log()
    await a.create("s1")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    batch = await a.read("s1", 0, timeout=0.3)
    assert batch is not None and batch.events == [] and not batch.ended
    assert loop.time() - t0 >= 0.25


async def test_the_final_event_ends_the_log_for_every_reader(make_log: MakeLog) -> None:
    a, b = await make_log(), await make_log()
    await a.create("s1")
    await a.append("s1", "delta", '{"content":"x"}')
    await a.append("s1", "usage", '{"total_tokens":3}')
    assert await a.append("s1", "done", '{"finish_reason":"stop"}') == 3
    assert await a.append("s1", "delta", '{"content":"late"}') is None
    everything = await b.read("s1", 0, timeout=5)
    assert everything is not None and everything.ended
    assert [e.kind for e in everything.events] == ["delta", "usage", "done"]
    at_end = await b.read("s1", 3, timeout=5)  # does not block: the log has ended
    assert at_end is not None and at_end.events == [] and at_end.ended
    partial = await b.read("s1", 1, timeout=0, limit=1)
    assert partial is not None and not partial.ended  # the final event is still ahead


async def test_unknown_and_expired_streams_read_as_none(make_log: MakeLog) -> None:
    a = await make_log(ttl=0.3)
    assert await a.read("nope", 0, timeout=0) is None
    assert await a.cancel("nope") is False
    await a.create("s1")
    await a.append("s1", "done", '{"finish_reason":"stop"}')
    assert await a.read("s1", 0, timeout=0) is not None
    await asyncio.sleep(0.5)
    assert await a.read("s1", 0, timeout=0) is None


async def test_a_reused_id_is_refused(make_log: MakeLog) -> None:
    a, b = await make_log(), await make_log()
    await a.create("s1")
    with pytest.raises(ValueError):
        await b.create("s1")


@pytest.mark.parametrize("bound", ["events", "bytes"])
async def test_the_log_is_bounded_like_the_memory_log(make_log: MakeLog, bound: str) -> None:
    limits = (
        {"max_events": 4, "max_bytes": 1 << 20}
        if bound == "events"
        else {"max_events": 100, "max_bytes": 40}
    )
    redis_log = await make_log(**limits)
    memory_log = MemoryEventLog(ttl=60, **limits)
    results = []
    for log in (redis_log, memory_log):
        await log.create("s1")
        ids = [await log.append("s1", "delta", '{"content":"0123456789"}') for _ in range(6)]
        batch = await log.read("s1", 0, timeout=0)
        assert batch is not None
        results.append((ids, [(e.id, e.kind, e.data) for e in batch.events], batch.ended))
    memory_log.close()
    assert results[0] == results[1]
    ids, events, ended = results[0]
    assert ended and events[-1][1] == "fail" and "stream_too_long" in events[-1][2]
    assert None in ids


async def test_cancel_on_another_instance_reaches_the_owner_at_once(make_log: MakeLog) -> None:
    owner, other = await make_log(lease_ttl=30), await make_log(lease_ttl=30)
    await owner.create("s1")
    await owner.append("s1", "delta", '{"content":"x"}')
    waiter = asyncio.create_task(owner.wait_ended("s1"))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    assert await other.cancel("s1") is True
    await asyncio.wait_for(waiter, 2)  # by pub/sub: the 10 s renew poll would be too late
    assert await owner.append("s1", "delta", '{"content":"y"}') is None
    batch = await other.read("s1", 0, timeout=0)
    assert batch is not None and batch.ended
    assert [(e.kind, e.data) for e in batch.events][-1] == ("done", '{"finish_reason":"cancelled"}')
    assert await other.cancel("s1") is True  # known, already ended


async def test_wait_ended_returns_for_an_already_ended_or_unknown_stream(make_log: MakeLog) -> None:
    a, b = await make_log(), await make_log()
    await a.create("s1")
    await a.append("s1", "done", '{"finish_reason":"stop"}')
    await asyncio.wait_for(b.wait_ended("s1"), 2)
    await asyncio.wait_for(b.wait_ended("unknown"), 2)


async def test_readers_get_fail_when_the_owner_dies(make_log: MakeLog) -> None:
    owner, reader = await make_log(lease_ttl=0.5), await make_log(lease_ttl=0.5)
    await owner.create("s1")
    await owner.append("s1", "delta", '{"content":"x"}')
    await owner.close()  # the owner's process stops renewing: it "died"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    got = []
    while True:
        batch = await reader.read("s1", got[-1].id if got else 0, timeout=5)
        assert batch is not None
        got.extend(batch.events)
        if batch.ended:
            break
        assert loop.time() - t0 < 5
    assert loop.time() - t0 < 2.0  # within about one lease, not forever
    assert [e.kind for e in got] == ["delta", "fail"]
    assert json.loads(got[-1].data)["error"]["code"] == "stream_owner_lost"


async def test_a_live_owner_keeps_its_stream_through_silence(make_log: MakeLog) -> None:
    owner, reader = await make_log(lease_ttl=0.4), await make_log(lease_ttl=0.4)
    await owner.create("s1")
    batch = await reader.read("s1", 0, timeout=1.5)  # ~4 leases of silence
    assert batch is not None and batch.events == [] and not batch.ended
    assert await owner.append("s1", "delta", '{"content":"x"}') == 1


async def test_redis_down_refuses_new_streams_with_503(
    make_log: MakeLog, redis_server: RedisServer
) -> None:
    a = await make_log()
    redis_server.stop()
    with pytest.raises(RedisUnavailable) as exc:
        await a.create("s1")
    assert exc.value.status == 503


async def test_a_following_reader_waits_out_a_redis_outage(
    make_log: MakeLog, redis_server: RedisServer
) -> None:
    a = await make_log()
    await a.create("s1")
    redis_server.stop()
    with pytest.raises(RedisUnavailable):
        await a.read("s1", 0, timeout=0)  # a first look: 503
    batch = await a.read("s1", 0, timeout=0.3)  # following: "nothing yet", no exception
    assert batch is not None and batch.events == [] and not batch.ended
    redis_server.start()  # restarted empty: the stream is gone
    assert await a.read("s1", 0, timeout=2) is None


async def test_a_cancel_heard_while_an_append_is_in_flight_still_ends_it(
    make_log: MakeLog,
) -> None:
    owner, other = await make_log(lease_ttl=30), await make_log(lease_ttl=30)
    await owner.create("s1")
    waiter = asyncio.create_task(owner.wait_ended("s1"))
    real = owner._append

    async def cancelled_before_the_reply(*, keys: list[str], args: list[object]) -> object:
        n = await real(keys=keys, args=args)
        assert await other.cancel("s1") is True  # after this append, before its reply
        await owner.renew()  # heard now; decided when the append answers
        assert not waiter.done()
        return n

    owner._append = cancelled_before_the_reply  # type: ignore[assignment]
    assert await owner.append("s1", "delta", '{"content":"x"}') == 1
    owner._append = real
    await asyncio.wait_for(waiter, 2)
    assert await owner.append("s1", "delta", '{"content":"y"}') is None
