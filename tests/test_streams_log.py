"""The memory event log: sequence ids, reads after N, bounds, cancel, expiry. No server."""

from __future__ import annotations

import asyncio

import pytest

from gateway.streams.log import CANCELLED_DATA, DELTA, DONE, FAIL, MemoryEventLog


def make(**kw: float) -> MemoryEventLog:
    args = {"max_events": 100, "max_bytes": 1 << 20, "ttl": 60.0, **kw}
    return MemoryEventLog(
        max_events=int(args["max_events"]), max_bytes=int(args["max_bytes"]), ttl=args["ttl"]
    )


async def test_ids_are_sequence_numbers_and_reads_are_after_n() -> None:
    log = make()
    await log.create("s")
    ids = [await log.append("s", DELTA, f'{{"content":"{i}"}}') for i in range(3)]
    assert ids == [1, 2, 3]
    batch = await log.read("s", 1, timeout=0)
    assert batch is not None
    assert [e.id for e in batch.events] == [2, 3] and not batch.ended
    assert (await log.read("s", 0, timeout=0, limit=2)).events[-1].id == 2  # type: ignore[union-attr]


async def test_read_blocks_until_an_append_arrives() -> None:
    log = make()
    await log.create("s")
    reader = asyncio.create_task(log.read("s", 0, timeout=30))
    await asyncio.sleep(0)
    assert not reader.done()
    await log.append("s", DELTA, "{}")
    batch = await asyncio.wait_for(reader, 5)
    assert batch is not None and [e.id for e in batch.events] == [1]


async def test_read_of_nothing_new_returns_empty_after_timeout() -> None:
    log = make()
    await log.create("s")
    batch = await log.read("s", 0, timeout=0.01)
    assert batch is not None and list(batch.events) == [] and not batch.ended


async def test_final_event_ends_the_log_and_refuses_appends() -> None:
    log = make()
    await log.create("s")
    await log.append("s", DELTA, "{}")
    assert await log.append("s", DONE, '{"finish_reason":"stop"}') == 2
    assert await log.append("s", DELTA, "{}") is None
    after_end = await log.read("s", 2, timeout=30)  # does not wait: the log has ended
    assert after_end is not None and after_end.ended and not after_end.events
    assert (await log.read("s", 0, timeout=0)).ended  # type: ignore[union-attr]


async def test_over_the_event_bound_the_log_ends_with_fail() -> None:
    log = make(max_events=3)
    await log.create("s")
    assert await log.append("s", DELTA, "{}") == 1
    assert await log.append("s", DELTA, "{}") == 2
    assert await log.append("s", DELTA, "{}") is None
    batch = await log.read("s", 0, timeout=0)
    assert batch is not None and len(batch.events) == 3
    assert batch.events[-1].kind == FAIL and "stream_too_long" in batch.events[-1].data
    assert batch.ended


async def test_over_the_byte_bound_the_log_ends_with_fail() -> None:
    log = make(max_bytes=1024)
    await log.create("s")
    assert await log.append("s", DELTA, "x" * 1000) == 1
    assert await log.append("s", DELTA, "y" * 100) is None
    batch = await log.read("s", 0, timeout=0)
    assert batch is not None and [e.kind for e in batch.events] == [DELTA, FAIL]


async def test_cancel_ends_with_done_cancelled_and_wakes_the_owner() -> None:
    log = make()
    await log.create("s")
    owner = asyncio.create_task(log.wait_ended("s"))
    await asyncio.sleep(0)
    assert not owner.done()
    assert await log.cancel("s") is True
    await asyncio.wait_for(owner, 5)
    batch = await log.read("s", 0, timeout=0)
    assert batch is not None and batch.events[-1].kind == DONE
    assert batch.events[-1].data == CANCELLED_DATA
    assert await log.cancel("s") is True  # already ended: still known, nothing added
    assert len((await log.read("s", 0, timeout=0)).events) == 1  # type: ignore[union-attr]
    assert await log.cancel("unknown") is False


async def test_ended_log_is_freed_after_the_ttl() -> None:
    log = make(ttl=0.05)
    await log.create("s")
    await log.append("s", FAIL, '{"error":{}}')
    assert len(log) == 1
    deadline = asyncio.get_running_loop().time() + 5
    while len(log) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert len(log) == 0
    assert await log.read("s", 0, timeout=0) is None
    assert await log.append("s", DELTA, "{}") is None


async def test_unended_log_is_kept() -> None:
    log = make(ttl=0.0)
    await log.create("s")
    await asyncio.sleep(0.05)
    assert await log.read("s", 0, timeout=0) is not None


async def test_duplicate_id_is_refused() -> None:
    log = make()
    await log.create("s")
    with pytest.raises(ValueError):
        await log.create("s")


async def test_ended_logs_kept_for_resuming_are_capped_in_total_oldest_dropped_first() -> None:
    # Each ended log holds ~1 KiB; the cap holds three. Without it, retained memory would
    # grow with the rate of streams times the ttl (found by the soak: +96% RSS in 10 min).
    log = MemoryEventLog(max_events=100, max_bytes=1 << 20, ttl=60.0, max_retained_bytes=3200)
    chunk = '{"content":"' + "x" * 1000 + '"}'
    for i in range(10):
        await log.create(f"s{i}")
        await log.append(f"s{i}", DELTA, chunk)
        await log.append(f"s{i}", DONE, '{"finish_reason":"stop"}')
    kept = [i for i in range(10) if await log.read(f"s{i}", 0, timeout=0) is not None]
    assert kept == [7, 8, 9]
    assert len(log) == 3
    # A running log is never dropped for the cap, however many end around it.
    await log.create("live")
    await log.append("live", DELTA, chunk)
    for i in range(10, 15):
        await log.create(f"s{i}")
        await log.append(f"s{i}", DONE, chunk)
    assert await log.read("live", 0, timeout=0) is not None
    log.close()
