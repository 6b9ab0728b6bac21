"""Usage accounting: recorded from every upstream style, stripped when the client never asked."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from gateway.sse import EventSplitter, iter_events
from gateway.usage import tap as usage_module
from gateway.usage.tap import Usage, UsageTap, ensure_usage_requested

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
USAGE = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    """One event the way OpenAI writes it: compact JSON on one data line."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**BASE, "choices": [choice], **extra}


def relay(tap: UsageTap, stream: bytes, cuts: list[int] | None = None) -> bytes:
    """Run `stream` through a splitter and `tap`, chunked at `cuts`."""
    bounds = [0, *(cuts or []), len(stream)]
    splitter = EventSplitter()
    out = [tap.process(splitter.feed(stream[a:b])) for a, b in itertools.pairwise(bounds)]
    return b"".join(out) + splitter.flush()


OPENAI_CHUNKS = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hello"}),
    chunk({"content": " world"}),
    chunk({}, "stop"),
]
# OpenAI with include_usage: `"usage": null` in every chunk, then a usage-only chunk.
OPENAI = (
    b"".join(sse({**c, "usage": None}) for c in OPENAI_CHUNKS)
    + sse({**BASE, "choices": [], "usage": USAGE})
    + DONE
)
OPENAI_STRIPPED = b"".join(sse(c) for c in OPENAI_CHUNKS) + DONE

# vLLM style: usage beside a last choice with an empty delta.
VLLM = (
    b"".join(sse(c) for c in OPENAI_CHUNKS)
    + sse(chunk({}, usage=USAGE))
    + DONE
)
# Usage on the last content chunk.
LAST_CHUNK = (
    b"".join(sse(c) for c in OPENAI_CHUNKS[:-1])
    + sse(chunk({"content": "!"}, "stop", usage=USAGE))
    + DONE
)
LAST_CHUNK_STRIPPED = (
    b"".join(sse(c) for c in OPENAI_CHUNKS[:-1]) + sse(chunk({"content": "!"}, "stop")) + DONE
)
RESPONSES = (
    b"event: response.created\n"
    + sse({"type": "response.created", "response": {"id": "r1", "usage": None}})
    + b"event: response.output_text.delta\n"
    + sse({"type": "response.output_text.delta", "delta": "Hi"})
    + b"event: response.completed\n"
    + sse(
        {
            "type": "response.completed",
            "response": {
                "id": "r1",
                "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7},
            },
        }
    )
)


# Usage.from_obj


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (USAGE, Usage(9, 2, 11)),
        ({"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}, Usage(5, 2, 7)),
        ({"input_tokens": 5, "output_tokens": 2}, Usage(5, 2, 7)),
        ({"prompt_tokens": 3, "completion_tokens": None}, Usage(3, 0, 3)),
        ({"prompt_tokens": 8, "total_tokens": 8}, Usage(8, 0, 8)),
    ],
)
def test_usage_from_obj_reads_chat_and_responses_names(obj: object, expected: Usage) -> None:
    assert Usage.from_obj(obj) == expected


@pytest.mark.parametrize("obj", [None, [], "usage", {}, {"prompt_tokens": True}, {"x": 1}])
def test_usage_from_obj_returns_none_without_any_count(obj: object) -> None:
    assert Usage.from_obj(obj) is None


# ensure_usage_requested


def test_stream_request_without_stream_options_gets_include_usage() -> None:
    body: dict[str, Any] = {"model": "m", "stream": True}
    assert ensure_usage_requested(body) is True
    assert body["stream_options"] == {"include_usage": True}


def test_other_stream_options_are_kept() -> None:
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_obfuscation": False}}
    assert ensure_usage_requested(body) is True
    assert body["stream_options"] == {"include_obfuscation": False, "include_usage": True}


def test_include_usage_false_is_turned_on_and_marked_for_stripping() -> None:
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": False}}
    assert ensure_usage_requested(body) is True
    assert body["stream_options"] == {"include_usage": True}


def test_request_that_asked_for_usage_is_left_alone() -> None:
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    assert ensure_usage_requested(body) is False
    assert body == {"stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("stream", [False, None, "true", 1])
def test_non_stream_request_is_left_alone(stream: object) -> None:
    body: dict[str, Any] = {"model": "m", "stream": stream}
    assert ensure_usage_requested(body) is False
    assert "stream_options" not in body


def test_stream_options_that_is_not_an_object_is_left_for_the_upstream() -> None:
    body: dict[str, Any] = {"stream": True, "stream_options": "yes"}
    assert ensure_usage_requested(body) is False
    assert body["stream_options"] == "yes"


# UsageTap: recording


@pytest.mark.parametrize("stream", [OPENAI, VLLM, LAST_CHUNK], ids=["openai", "vllm", "last"])
def test_usage_is_recorded_and_the_stream_forwarded_as_is_when_the_client_asked(
    stream: bytes,
) -> None:
    tap = UsageTap(strip=False)
    assert relay(tap, stream) == stream
    assert tap.usage == Usage(9, 2, 11)
    assert tap.done
    assert tap.finish_reason == "stop"


def test_responses_api_usage_is_recorded_from_response_completed() -> None:
    tap = UsageTap(strip=False)
    assert relay(tap, RESPONSES) == RESPONSES
    assert tap.usage == Usage(5, 2, 7)
    assert not tap.done


def test_process_returns_the_identical_object_when_no_usage_is_present() -> None:
    tap = UsageTap(strip=True)
    block = sse(chunk({"content": "Hello"}))
    assert tap.process(block) is block
    assert tap.process(DONE) is DONE
    assert tap.usage is None


def test_usage_null_chunks_pass_as_the_identical_object_when_not_stripping() -> None:
    block = sse(chunk({"content": "Hello"}, usage=None)) * 3
    assert UsageTap(strip=False).process(block) is block


@pytest.mark.parametrize("strip", [True, False])
def test_chunks_with_usage_null_cost_no_json_parse(
    strip: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_parse(data: str | bytes) -> Any:
        raise AssertionError(f"parsed {data!r}")

    monkeypatch.setattr(usage_module, "_loads", no_parse)
    spaced = b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}], "usage": null}\n\n'
    block = spaced + sse(chunk({"content": "b"}, usage=None)) + DONE
    UsageTap(strip=strip).process(block)


def test_last_non_null_usage_wins() -> None:
    tap = UsageTap(strip=False)
    tap.process(sse(chunk({"content": "a"}, usage={"prompt_tokens": 1})))
    tap.process(sse(chunk({"content": "b"}, usage=USAGE)))
    tap.process(sse(chunk({"content": "c"}, usage=None)))
    assert tap.usage == Usage(9, 2, 11)


def test_finish_reason_is_read_from_choice_zero() -> None:
    tap = UsageTap(strip=False)
    choices = [
        {"index": 0, "delta": {}, "finish_reason": "stop"},
        {"index": 1, "delta": {}, "finish_reason": "length"},
    ]
    tap.process(sse({**BASE, "choices": choices}))
    assert tap.finish_reason == "stop"


def test_done_is_set_only_by_a_done_line() -> None:
    tap = UsageTap(strip=False)
    tap.process(sse(chunk({"content": "data: [DONE]\n"})))
    assert not tap.done
    assert tap.process(DONE) is DONE
    assert tap.done


@pytest.mark.parametrize(
    "block",
    [
        DONE,
        b"data:[DONE]\n\n",
        b"data: [DONE]\r\n\r\n",
        b"data: [DONE]\r\r",
        b"data: [DONE] \t\n\n",
        sse(chunk({"content": "a"})) + DONE,
        b"event: x\r\ndata: 1\r\n\r\n" + b"data: [DONE]\r\n\r\n",
        # A real [DONE] line, then content quoting it: found from the end all the same.
        DONE + sse(chunk({"content": "data: [DONE]\n"})),
        DONE + sse(chunk({"content": "[DONE]"})) + sse(chunk({"content": "x[DONE]"})),
    ],
)
def test_a_done_line_is_found_anywhere_in_a_block(block: bytes) -> None:
    tap = UsageTap(strip=False)
    tap.process(block)
    assert tap.done


@pytest.mark.parametrize(
    "block",
    [
        b"data: [DONE]x\n\n",
        b"data: x[DONE]\n\n",
        b": data: [DONE]\n\n",
        sse(chunk({"content": "[DONE]"})) + sse(chunk({"content": "data: [DONE]"})),
    ],
)
def test_done_in_other_lines_is_not_the_end(block: bytes) -> None:
    tap = UsageTap(strip=False)
    tap.process(block)
    assert not tap.done


@pytest.mark.parametrize("strip", [True, False])
@pytest.mark.parametrize("name", ["OPENAI", "VLLM", "LAST_CHUNK"])
def test_a_whole_stream_in_one_block_is_processed_like_event_by_event(
    name: str, strip: bool
) -> None:
    stream = {"OPENAI": OPENAI, "VLLM": VLLM, "LAST_CHUNK": LAST_CHUNK}[name]
    whole, single = UsageTap(strip=strip), UsageTap(strip=strip)
    out = whole.process(stream)
    assert out == b"".join(single.process(raw) for raw in iter_events(stream))
    assert (whole.usage, whole.finish_reason, whole.done) == (
        single.usage,
        single.finish_reason,
        single.done,
    )
    assert whole.usage is not None and whole.done


# UsageTap: stripping what the client never asked for


def test_openai_usage_chunk_and_usage_nulls_are_removed() -> None:
    tap = UsageTap(strip=True)
    assert relay(tap, OPENAI) == OPENAI_STRIPPED
    assert tap.usage == Usage(9, 2, 11)
    assert tap.done
    assert tap.finish_reason == "stop"


def test_stripping_is_the_same_for_every_split_of_the_stream() -> None:
    for i in range(len(OPENAI) + 1):
        assert relay(UsageTap(strip=True), OPENAI, [i]) == OPENAI_STRIPPED, i


def test_vllm_usage_beside_an_empty_delta_drops_the_whole_event() -> None:
    tap = UsageTap(strip=True)
    assert relay(tap, VLLM) == b"".join(sse(c) for c in OPENAI_CHUNKS) + DONE
    assert tap.usage == Usage(9, 2, 11)


@pytest.mark.parametrize(
    "kept",
    [
        chunk({}, "stop", usage=USAGE),
        chunk({"content": "!"}, usage=USAGE),
        {**chunk({}, usage=USAGE), "choices": [{"index": 0, "delta": {}, "logprobs": {"x": 1}}]},
    ],
    ids=["finish_reason", "content", "logprobs"],
)
def test_usage_beside_a_choice_with_something_drops_only_the_usage_field(
    kept: dict[str, Any],
) -> None:
    without = {k: v for k, v in kept.items() if k != "usage"}
    assert UsageTap(strip=True).process(sse(kept)) == sse(without)


def test_usage_on_the_last_content_chunk_drops_only_the_usage_field() -> None:
    tap = UsageTap(strip=True)
    assert relay(tap, LAST_CHUNK) == LAST_CHUNK_STRIPPED
    assert tap.usage == Usage(9, 2, 11)
    assert tap.finish_reason == "stop"


def test_reencoded_event_keeps_its_id_and_event_fields() -> None:
    block = b"id: 5\nevent: chunk\r\n" + sse(chunk({"content": "!"}, usage=USAGE))
    expected = b"id: 5\nevent: chunk\n" + sse(chunk({"content": "!"}))
    assert UsageTap(strip=True).process(block) == expected


def test_crlf_usage_chunk_is_dropped_whole() -> None:
    block = b"data: " + json.dumps({**BASE, "choices": [], "usage": USAGE}).encode() + b"\r\n\r\n"
    tap = UsageTap(strip=True)
    assert tap.process(block) == b""
    assert tap.usage == Usage(9, 2, 11)


@pytest.mark.parametrize(
    ("data", "stripped"),
    [
        (b'{"id": "x", "choices": [], "usage": null}', b'{"id": "x", "choices": []}'),
        (b'{"usage": null, "id": "x"}', b'{"id": "x"}'),
        (b'{"usage":null}', b"{}"),
    ],
)
def test_usage_null_is_removed_wherever_the_key_sits(data: bytes, stripped: bytes) -> None:
    tap = UsageTap(strip=True)
    assert tap.process(b"data: " + data + b"\n\n") == b"data: " + stripped + b"\n\n"
    assert tap.usage is None


@pytest.mark.parametrize(
    "content",
    ['"usage": {"prompt_tokens": 1}', '"usage":null', ',"usage":null', "usage", "[DONE]"],
)
@pytest.mark.parametrize("strip", [True, False])
def test_content_that_mentions_usage_is_neither_altered_nor_read(
    content: str, strip: bool
) -> None:
    block = sse(chunk({"content": content}))
    tap = UsageTap(strip=strip)
    assert tap.process(block) == block
    assert tap.usage is None
    assert not tap.done


def test_content_that_mentions_usage_keeps_it_when_the_real_null_is_removed() -> None:
    block = sse(chunk({"content": '"usage":null'}, usage=None))
    assert UsageTap(strip=True).process(block) == sse(chunk({"content": '"usage":null'}))


def test_data_that_is_not_json_is_forwarded_as_is() -> None:
    block = b'data: "usage": 1\n\n'
    tap = UsageTap(strip=True)
    assert tap.process(block) == block
    assert tap.usage is None


def test_responses_api_stream_is_forwarded_unchanged() -> None:
    tap = UsageTap(strip=False)
    for i in range(0, len(RESPONSES) + 1, 7):
        assert relay(tap, RESPONSES, [i]) == RESPONSES
