"""Token usage accounting on an OpenAI-style stream, sans-IO.

The gateway always wants usage, so `ensure_usage_requested` asks the upstream for it, and a
`UsageTap` on the relayed stream records it and, when the client had not asked, removes it
again. Upstreams place usage differently:

- OpenAI: `"usage": null` in every chunk, then a last chunk with `"choices": []` and usage;
- vLLM and others: usage beside a final choice whose delta is empty;
- some: usage on the last content chunk;
- the Responses API: `response.usage` inside the `response.completed` event.

The tap sits on the hot path, so it reads bytes first and parses JSON only for the rare event
that carries a real usage object or a finish reason. That is safe because a JSON string
escapes every `"`: the bytes `"usage":` can only be an object key, never text in a string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..sse import SSEEvent, encode_event, event_start, iter_events, parse_event

__all__ = [
    "Usage",
    "UsageTap",
    "UsageTotals",
    "ensure_usage_requested",
    "first_choice",
    "json_object",
]


def _json_loads(s: str | bytes) -> Any:
    return json.loads(s)


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


_loads: Callable[[str | bytes], Any] = _json_loads
_dumps: Callable[[Any], bytes] = _json_dumps
try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; json is the fallback
    pass
else:
    _loads = orjson.loads
    _dumps = orjson.dumps

# `"usage": null` as a key, after a comma or first in its object (the `{` stays). Removing
# it is a byte replacement, no parse: OpenAI sends one in every chunk once usage is on. It
# would hit a nested `"usage": null` too; Chat/Completions chunks have none.
_NULL_AFTER_COMMA = re.compile(rb',[ \t]*"usage"[ \t]*:[ \t]*null')
_NULL_FIRST = re.compile(rb'\{[ \t]*"usage"[ \t]*:[ \t]*null(?:[ \t]*,[ \t]*)?')
# What is worth a parse: a usage key whose value is not null, or a finish reason being set.
# Possessive `*+` so that the blank before `null` cannot be given back to dodge `(?!null)`.
_WORTH_PARSING = re.compile(rb'"usage"[ \t]*+:[ \t]*+(?!null)|"finish_reason"[ \t]*+:[ \t]*+"')
# Any `"usage": null` left after the compact spelling's byte replacement.
_NULL = re.compile(rb'"usage"[ \t]*:[ \t]*null')
# `data: [DONE]` as a line of its own, matched at a line start (see `_has_done`).
_DONE_LINE = re.compile(rb"data: ?\[DONE\][ \t]*(?:\r\n|\r|\n)")


@dataclass(slots=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_obj(cls, obj: object) -> Usage | None:
        """Read an upstream usage object (Chat/Completions or Responses API names).

        Missing or null counts are 0; a missing total is prompt + completion. Returns None
        when `obj` is not an object carrying any count.
        """
        if not isinstance(obj, dict):
            return None
        prompt = _count(obj, "prompt_tokens", "input_tokens")
        completion = _count(obj, "completion_tokens", "output_tokens")
        total = _count(obj, "total_tokens")
        if prompt is None and completion is None and total is None:
            return None
        prompt, completion = prompt or 0, completion or 0
        return cls(prompt, completion, prompt + completion if total is None else total)


@dataclass(slots=True)
class UsageTotals:
    """One client's running totals, as `GET /v1/usage` returns them (with the client name)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def _count(obj: dict[Any, Any], *names: str) -> int | None:
    for name in names:
        value = obj.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def ensure_usage_requested(body: dict[str, Any]) -> bool:
    """Make a streaming Chat/Completions request ask for usage; True if the gateway added it.

    True means the client did not ask, so its stream's usage must be stripped
    (`UsageTap(strip=True)`). Other `stream_options` keys are kept. A `stream_options` that
    is not an object is left for the upstream to reject.
    """
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    if options is None:
        body["stream_options"] = {"include_usage": True}
        return True
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return False
    options["include_usage"] = True
    return True


class UsageTap:
    """Watch a relayed stream block by block: record usage, `done` and the finish reason.

    With `strip` (the gateway requested usage the client did not), usage is removed before
    the client sees it: `"usage": null` keys by byte replacement, a usage-only chunk as a
    whole event, and otherwise just the `usage` key of the chunk carrying it. Use `strip`
    only on Chat/Completions streams.
    """

    __slots__ = ("done", "finish_reason", "model", "response_id", "strip", "usage")

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.usage: Usage | None = None  # the last non-null usage seen
        self.done = False  # `data: [DONE]` seen
        self.finish_reason: str | None = None  # last one set on choice 0
        # The response's id and model, as the events parsed for the above carry them.
        self.response_id: str | None = None
        self.model: str | None = None

    def process(self, block: bytes) -> bytes:
        """Take a block of whole events (from `EventSplitter.feed`); return what to forward.

        A block with nothing to record or strip is returned as the very same object.
        """
        if _has_done(block):
            self.done = True
        if self.strip and b'"usage"' in block:
            block = block.replace(b',"usage":null', b"")  # OpenAI's own spelling: fastest
            if _NULL.search(block):
                # A null spelled another way (spaces, first key): the regexes, which try
                # every byte, only then.
                block = _NULL_FIRST.sub(b"{", _NULL_AFTER_COMMA.sub(b"", block))
        # One scan for the first event worth a parse (most blocks have none): every key of
        # the kind is looked at where it is, whatever its spelling.
        first = _WORTH_PARSING.search(block)
        if first is None:
            return block
        # Only the events from the first one worth a parse on are split and looked at (a
        # whole stream can come in one block; its head passes through as it is).
        start = event_start(block, first.start())
        tail = b"".join(
            self._process_event(raw) if _WORTH_PARSING.search(raw) else raw
            for raw in iter_events(block[start:])
        )
        return block[:start] + tail if start else tail

    def _process_event(self, raw: bytes) -> bytes:
        obj, event = _event_object(raw)
        if obj is None:
            return raw  # no JSON object: not ours to judge, forward it
        choices = obj.get("choices")
        if isinstance(choices, list):
            self._note_finish(choices)
        response = obj.get("response")
        if isinstance(response, dict):  # Responses API: `response.completed` and kin
            self._note_usage(response.get("usage"))
            self._note_response(response)
        else:
            self._note_response(obj)
        if "usage" not in obj:
            return raw
        self._note_usage(obj["usage"])
        if not self.strip:
            return raw
        if obj["usage"] is not None and _only_empty_choices(choices):
            return b""  # a usage-only chunk: the client never asked for it
        del obj["usage"]
        data = _dumps(obj).decode()
        if event is None:
            return encode_event(data)
        return encode_event(data, event=event.event, id=event.id, retry=event.retry)

    def _note_usage(self, obj: object) -> None:
        usage = Usage.from_obj(obj)
        if usage is not None:
            self.usage = usage

    def _note_response(self, obj: dict[str, Any]) -> None:
        rid, model = obj.get("id"), obj.get("model")
        if isinstance(rid, str):
            self.response_id = rid
        if isinstance(model, str):
            self.model = model

    def _note_finish(self, choices: list[Any]) -> None:
        choice = first_choice(choices)
        if choice is not None and isinstance(reason := choice.get("finish_reason"), str):
            self.finish_reason = reason


def _event_object(raw: bytes) -> tuple[dict[str, Any] | None, SSEEvent | None]:
    """An event's data as a JSON object, and the event when it had to be parsed for it.

    The one shape upstreams send, `data: {...}` and its blank line, has no field but the
    data: its bytes are loaded as they are. Anything else, or bytes that do not load (the
    SSE parser reads invalid UTF-8 as U+FFFD), goes through `parse_event`.
    """
    if (
        raw.startswith(b"data: ")
        and raw.endswith(b"\n\n")
        and raw.find(b"\n") == len(raw) - 2
        and b"\r" not in raw
    ):
        obj = json_object(raw[6:-2])
        if obj is not None:
            return obj, None
    event = parse_event(raw)
    if event is None or event.data is None:
        return None, event
    return json_object(event.data), event


def json_object(data: str | bytes) -> dict[str, Any] | None:
    """An event's data as a JSON object, or None (not JSON, or not an object): what the tap
    and every sink parse of the events they care about."""
    try:
        obj = _loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def first_choice(choices: object) -> dict[str, Any] | None:
    """A chunk's `choices[index 0]` (the one a single-answer client reads), if any."""
    if isinstance(choices, list):
        for c in choices:
            if isinstance(c, dict) and c.get("index", 0) == 0:
                return c
    return None


def _has_done(block: bytes) -> bool:
    """Whether `data: [DONE]` is a line of its own in `block` (a block of whole events).

    Looked for as a literal from the end, where it is, then checked at its line's start: a
    regex searched from the front would try every byte of a block holding a whole stream. A
    raw line break never occurs inside JSON text, so a `[DONE]` in content cannot pass.
    """
    i = block.rfind(b"[DONE]")
    while i >= 0:
        line = max(block.rfind(b"\n", 0, i), block.rfind(b"\r", 0, i)) + 1
        if _DONE_LINE.match(block, line):
            return True
        i = block.rfind(b"[DONE]", 0, line)
    return False


def _only_empty_choices(choices: object) -> bool:
    """True when no choice carries anything: no delta content, text, finish or logprobs."""
    if choices is None:
        return True
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            return False
        if choice.get("finish_reason") is not None or choice.get("logprobs") is not None:
            return False
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict) or any(delta.values()) or choice.get("text"):
            return False
    return True
