"""The log layout of a background response, with no event loop: events numbered and made
ours, the log's own end markers turned into what a Responses client reads."""

from __future__ import annotations

import orjson

from gateway.responses import objects
from gateway.streams.log import CANCELLED_DATA, DONE, FAIL, OVERFLOW_DATA, Event

BASE = objects.created("resp_x", {"model": "m", "instructions": "be brief"}, 7)


def test_created_echoes_the_request_and_says_background() -> None:
    assert BASE["id"] == "resp_x" and BASE["object"] == "response"
    assert BASE["background"] is True and BASE["status"] == "in_progress"
    assert BASE["instructions"] == "be brief" and BASE["tools"] == []


def test_an_upstream_event_is_renumbered_and_its_response_made_ours() -> None:
    upstream = {"type": "response.created", "sequence_number": 99,
                "response": {"id": "resp_upstream", "status": "in_progress", "created_at": 1}}
    out = orjson.loads(objects.ours(upstream, "response.created", 0, BASE))
    assert out["sequence_number"] == 0
    assert out["response"]["id"] == "resp_x" and out["response"]["created_at"] == 7
    assert out["response"]["background"] is True


def test_event_types_that_are_log_kinds_or_unsafe_are_refused() -> None:
    for bad in ("done", "fail", "meta", "a\nb", "", 3):
        assert objects.event_type({"type": bad}, None) is None
    assert objects.event_type({}, "response.in_progress") == "response.in_progress"


def test_a_cancel_marker_ends_the_stream_silently_and_settles_cancelled() -> None:
    marker = Event(9, DONE, CANCELLED_DATA)
    assert objects.encode([marker], BASE) == b""
    assert objects.settled(BASE, marker)["status"] == "cancelled"


def test_a_log_failure_becomes_response_failed_with_the_next_sequence_number() -> None:
    marker = Event(9, FAIL, OVERFLOW_DATA)
    wire = objects.encode([marker], BASE).decode()
    assert wire.startswith("event: response.failed\ndata: ")
    event = orjson.loads(wire.split("data: ", 1)[1])
    assert event["sequence_number"] == 9 - objects.FIRST
    assert event["response"]["error"]["code"] == "stream_too_long"
    assert objects.settled(BASE, marker)["status"] == "failed"


def test_the_meta_event_is_never_sent() -> None:
    meta = Event(1, objects.META, objects.meta("tester", BASE))
    assert objects.encode([meta], BASE) == b""
    assert objects.read_meta(meta) == ("tester", BASE)
    assert objects.read_meta(Event(2, "response.created", "{}")) is None
