"""The Responses API's objects and events, as a background response's log holds them. No I/O.

A background response is one event log (`gateway.streams.log`) under its id:

    id 1     kind "meta": {"client": owner, "response": the Response as created}; never sent
    id 2...  the upstream's events, kind = the event's `type`, data = the event's JSON with
             `sequence_number` = id - 2 (the upstream's own numbering when it counts from 0
             by one, as OpenAI's does) and any `response` object given our id
    last     kind `done` (response.completed / response.incomplete) or `fail`
             (response.failed), or a marker the log itself writes: `done` {"finish_reason":
             "cancelled"} (cancel), `fail` {"error": ...} (owner lost, over the log's bound)

So the log alone is the response's state: it lives, expires and crosses instances with it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson

from ..sse import encode_event
from ..streams.log import DONE, FAIL, FINAL_KINDS, Event

Json = dict[str, Any]

META = "meta"
# Event ids of the log: the meta event, then sequence number N at id N + FIRST.
FIRST = 2
# Upstream events that end a response, and the log kind each is written as.
TERMINAL = {"response.completed": DONE, "response.incomplete": DONE, "response.failed": FAIL}
# An event type we pass on (it becomes an SSE `event:` line and a log kind).
_TYPE = re.compile(r"[A-Za-z0-9_.\-]{1,100}")

# Request fields a Response object echoes, with OpenAI's defaults.
_ECHOED: Json = {
    "instructions": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "temperature": None,
    "tool_choice": "auto",
    "tools": [],
    "top_p": None,
    "max_output_tokens": None,
    "previous_response_id": None,
    "reasoning": None,
    "text": None,
    "truncation": None,
    "user": None,
}


def created(response_id: str, body: Json, created_at: int) -> Json:
    """The Response of a background request the upstream has accepted: "in_progress" until
    its log ends (the create call answers once the upstream's headers are in)."""
    out: Json = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": True,
        "model": body["model"],
        "output": [],
        "usage": None,
        "error": None,
        "incomplete_details": None,
    }
    for key, default in _ECHOED.items():
        value = body.get(key)
        out[key] = default if value is None else value
    return out


def meta(client: str, response: Json) -> str:
    return orjson.dumps({"client": client, "response": response}).decode()


def read_meta(event: Event) -> tuple[str, Json] | None:
    """(owner, Response as created) from a log's first event; None when it is not one."""
    if event.id != 1 or event.kind != META:
        return None
    obj = orjson.loads(event.data)
    return str(obj["client"]), obj["response"]


def event_type(obj: Json, sse_event: str | None) -> str | None:
    """The type of an upstream event (its `type`, else the SSE event name), or None when it
    has none we could pass on."""
    type_ = obj.get("type", sse_event)
    if not isinstance(type_, str) or not _TYPE.fullmatch(type_):
        return None
    if type_ in FINAL_KINDS or type_ == META:
        return None  # a log kind of ours, never an upstream's
    return type_


def ours(obj: Json, type_: str, seq: int, base: Json) -> str:
    """An upstream event as the log keeps it: numbered, its `response` object made ours
    (our id, created_at and `background`, the request's echoed fields where it has none)."""
    out = {**obj, "type": type_, "sequence_number": seq}
    resp = obj.get("response")
    if isinstance(resp, dict):
        out["response"] = {**base, **resp, **_identity(base)}
    return orjson.dumps(out).decode()


def _identity(base: Json) -> Json:
    return {"id": base["id"], "created_at": base["created_at"], "background": True}


def failed_event(base: Json, seq: int, error: object) -> str:
    """OpenAI's `response.failed` event for a failure the gateway saw (or was told of)."""
    return orjson.dumps(_failed(base, seq, error)).decode()


def _failed(base: Json, seq: int, error: object) -> Json:
    response = {**base, "status": "failed", "error": _error(error)}
    return {"type": "response.failed", "sequence_number": seq, "response": response}


def _error(error: object) -> Json:
    """A Response's `error` ({"code", "message"}) from an OpenAI error object."""
    if not isinstance(error, dict):
        return {"code": "server_error", "message": "The response failed"}
    code = error.get("code") or error.get("type") or "server_error"
    message = error.get("message")
    return {"code": str(code), "message": message if isinstance(message, str) else str(error)}


def _final(event: Event, base: Json) -> Json | None:
    """The last event of an ended log as the event a client gets, or None (a cancel: the
    stream just ends, as OpenAI's does; the Response says "cancelled")."""
    obj = orjson.loads(event.data)
    if "type" in obj:
        return dict(obj)
    if "error" in obj:  # written by the log itself: owner lost, too long
        return _failed(base, event.id - FIRST, obj["error"])
    return None


def encode(events: Sequence[Event], base: Json) -> bytes:
    """Events of a log as the SSE a Responses client reads (`event:` type, `data:` JSON)."""
    out: list[bytes] = []
    for e in events:
        if e.kind == META:
            continue
        if e.kind not in FINAL_KINDS:
            out.append(encode_event(e.data, event=e.kind))
        elif (obj := _final(e, base)) is not None:
            out.append(encode_event(orjson.dumps(obj).decode(), event=str(obj["type"])))
    return b"".join(out)


def settled(base: Json, last: Event) -> Json:
    """The Response of an ended log, from its last event."""
    obj = orjson.loads(last.data)
    if isinstance(obj.get("response"), dict):
        return dict(obj["response"])
    if "error" in obj:
        return {**base, "status": "failed", "error": _error(obj["error"])}
    return {**base, "status": "cancelled"}


def deleted(response_id: str) -> bytes:
    return orjson.dumps({"id": response_id, "object": "response.deleted", "deleted": True})
