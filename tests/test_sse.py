"""The SSE codec: exact bytes out, the same events in whatever the chunking."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import (
    EventSplitter,
    SSEError,
    SSEEvent,
    encode_comment,
    encode_event,
    iter_events,
    parse_event,
)

SEPS = [b"\n", b"\r", b"\r\n"]
SEP_IDS = ["LF", "CR", "CRLF"]

STREAM = (
    b": hello\n\n"
    b"retry: 3000\n\n"
    b"id: 1\nevent: delta\ndata: {\"a\": 1}\n\n"
    b"data: line one\ndata:line two\n\n"
    b"data\n\n"
    b"data: [DONE]\n\n"
)
EVENTS = [
    SSEEvent(None, retry=3000),
    SSEEvent('{"a": 1}', event="delta", id="1"),
    SSEEvent("line one\nline two"),
    SSEEvent(""),
    SSEEvent("[DONE]"),
]


def with_endings(lf_text: bytes, seps: list[bytes]) -> bytes:
    """Rewrite every LF of `lf_text`, cycling through `seps`.

    A lone CR followed by an empty line ending in LF would read as one CRLF, so that LF
    becomes a CRLF.
    """
    lines = lf_text.split(b"\n")
    ends = itertools.cycle(seps)
    out, prev = [], b""
    for line in lines[:-1]:
        sep = next(ends)
        if prev == b"\r" and not line and sep == b"\n":
            sep = b"\r\n"
        out += [line, sep]
        prev = sep
    return b"".join(out) + lines[-1]


STREAMS = {
    "LF": STREAM,
    "CR": with_endings(STREAM, [b"\r"]),
    "CRLF": with_endings(STREAM, [b"\r\n"]),
    "mixed": with_endings(STREAM, [b"\r\n", b"\r", b"\n", b"\r"]),
}


def events_of(blocks: list[bytes]) -> list[SSEEvent]:
    parsed = (parse_event(raw) for block in blocks for raw in iter_events(block))
    return [e for e in parsed if e is not None]


def run(chunks: list[bytes], max_event_bytes: int = 1 << 20) -> list[bytes]:
    splitter = EventSplitter(max_event_bytes)
    blocks = [splitter.feed(chunk) for chunk in chunks]
    return [*blocks, splitter.flush()]


# Encoding


@pytest.mark.parametrize("sep", ["\n", "\r", "\r\n"], ids=SEP_IDS)
def test_encode_event_writes_one_data_line_per_line_of_data(sep: str) -> None:
    assert encode_event(f"a{sep}b{sep}{sep}c") == b"data: a\ndata: b\ndata: \ndata: c\n\n"


def test_encode_event_writes_id_event_data_then_retry() -> None:
    assert encode_event("x", event="delta", id=7, retry=3000) == (
        b"id: 7\nevent: delta\ndata: x\nretry: 3000\n\n"
    )


def test_encode_event_without_data_writes_no_data_line() -> None:
    assert encode_event(retry=3000) == b"retry: 3000\n\n"


def test_encode_event_with_empty_data_writes_an_empty_data_line() -> None:
    assert encode_event("") == b"data: \n\n"


def test_encode_event_writes_utf8() -> None:
    assert encode_event("héllo ✓") == "data: héllo ✓\n\n".encode()


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb"])
def test_encode_event_rejects_a_line_break_in_the_event_name(bad: str) -> None:
    with pytest.raises(ValueError):
        encode_event("x", event=bad)


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\0b"])
def test_encode_event_rejects_a_line_break_or_nul_in_the_id(bad: str) -> None:
    with pytest.raises(ValueError):
        encode_event("x", id=bad)


def test_encode_event_rejects_a_negative_retry() -> None:
    with pytest.raises(ValueError):
        encode_event(retry=-1)


def test_encode_comment_is_a_colon_line_then_a_blank_line() -> None:
    assert encode_comment("ping") == b": ping\n\n"


def test_encode_comment_splits_lines() -> None:
    assert encode_comment("a\r\nb") == b": a\n: b\n\n"


# Parsing


@pytest.mark.parametrize("sep", SEPS, ids=SEP_IDS)
def test_parse_joins_data_lines_with_lf(sep: bytes) -> None:
    raw = b"data: a" + sep + b"data: b" + sep + sep
    assert parse_event(raw) == SSEEvent("a\nb")


@pytest.mark.parametrize("sep", SEPS, ids=SEP_IDS)
def test_parse_reads_event_id_and_retry(sep: bytes) -> None:
    raw = sep.join([b"event: delta", b"id: 42", b"retry: 500", b"data: x", b"", b""])
    assert parse_event(raw) == SSEEvent("x", event="delta", id="42", retry=500)


def test_parse_removes_only_one_leading_space() -> None:
    assert parse_event(b"data:  x\n\n") == SSEEvent(" x")
    assert parse_event(b"data:x\n\n") == SSEEvent("x")


def test_parse_reads_a_field_without_colon_as_an_empty_value() -> None:
    assert parse_event(b"data\n\n") == SSEEvent("")


def test_parse_keeps_colons_after_the_first() -> None:
    assert parse_event(b"data: a: b\n\n") == SSEEvent("a: b")


def test_parse_ignores_unknown_fields_and_comments() -> None:
    assert parse_event(b": note\nfoo: bar\ndata: x\n\n") == SSEEvent("x")


def test_parse_ignores_an_id_containing_nul() -> None:
    assert parse_event(b"id: a\0b\ndata: x\n\n") == SSEEvent("x")


def test_parse_keeps_an_empty_id_which_resets_the_last_event_id() -> None:
    assert parse_event(b"id\ndata: x\n\n") == SSEEvent("x", id="")


@pytest.mark.parametrize("value", [b"30s", b"", b"-1", b"  1", "١٢".encode()])
def test_parse_ignores_retry_unless_all_ascii_digits(value: bytes) -> None:
    assert parse_event(b"retry:" + value + b"\ndata: x\n\n") == SSEEvent("x")


def test_parse_reads_an_empty_event_name_as_the_default() -> None:
    assert parse_event(b"event:\ndata: x\n\n") == SSEEvent("x")


def test_parse_keeps_id_and_retry_of_a_block_without_data() -> None:
    assert parse_event(b"id: 9\nretry: 10\n\n") == SSEEvent(None, id="9", retry=10)


@pytest.mark.parametrize("raw", [b": ping\n\n", b"\n", b"\r\n", b"", b"foo: bar\n\n"])
def test_parse_returns_none_for_a_block_without_fields(raw: bytes) -> None:
    assert parse_event(raw) is None


def test_parse_replaces_invalid_utf8() -> None:
    assert parse_event(b"data: a\xffb\n\n") == SSEEvent("a\ufffdb")


def test_parse_stops_at_the_first_blank_line() -> None:
    assert parse_event(b"data: a\n\ndata: b\n\n") == SSEEvent("a")


# Splitting a block into events


@pytest.mark.parametrize("sep", SEPS, ids=SEP_IDS)
def test_iter_events_keeps_each_events_blank_line(sep: bytes) -> None:
    first = b"data: a" + sep + b"data: b" + sep + sep
    second = b": c" + sep + sep
    assert iter_events(first + second + sep) == [first, second, sep]


def test_iter_events_reads_crlf_as_one_line_end() -> None:
    assert iter_events(b"data: a\r\n\r\ndata: b\r\r") == [b"data: a\r\n\r\n", b"data: b\r\r"]


def test_iter_events_returns_trailing_partial_bytes_last() -> None:
    assert iter_events(b"data: a\n\ndata: b\n") == [b"data: a\n\n", b"data: b\n"]


def test_iter_events_of_nothing_is_empty() -> None:
    assert iter_events(b"") == []


# The splitter


def test_feed_returns_complete_events_and_holds_the_rest() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\n\ndata: b\n") == b"data: a\n\n"
    assert splitter.pending == len(b"data: b\n")
    assert splitter.feed(b"\n") == b"data: b\n\n"
    assert splitter.pending == 0


def test_feed_returns_the_same_object_for_a_chunk_of_whole_events() -> None:
    chunk = b"data: a\n\ndata: b\n\n"
    assert EventSplitter().feed(chunk) is chunk


def test_feed_of_nothing_returns_nothing() -> None:
    assert EventSplitter().feed(b"") == b""


@pytest.mark.parametrize("name", list(STREAMS))
def test_stream_split_at_every_byte_position_gives_the_same_events(name: str) -> None:
    stream = STREAMS[name]
    for i in range(len(stream) + 1):
        blocks = run([stream[:i], stream[i:]])
        assert b"".join(blocks) == stream
        assert blocks[-1] == b""  # flush: nothing left over
        assert events_of(blocks) == EVENTS, i


@pytest.mark.parametrize("name", list(STREAMS))
def test_stream_fed_one_byte_at_a_time_gives_the_same_events(name: str) -> None:
    stream = STREAMS[name]
    blocks = run([stream[i : i + 1] for i in range(len(stream))])
    assert b"".join(blocks) == stream
    assert events_of(blocks) == EVENTS


@pytest.mark.parametrize("name", ["LF", "CRLF"])
def test_lf_ended_stream_gives_the_same_raw_events_for_any_split(name: str) -> None:
    stream = STREAMS[name]
    whole = iter_events(stream)
    for i in range(len(stream) + 1):
        if stream[:i].endswith(b"\r\n\r") and stream[i:].startswith(b"\n"):
            continue  # a split inside a CRLF blank line: covered below
        raws = [raw for block in run([stream[:i], stream[i:]]) for raw in iter_events(block)]
        assert raws == whole, i


def test_event_split_across_crlf_is_found() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\n\r") == b"data: a\r\n\r"
    assert splitter.feed(b"\ndata: b\r\n\r\n") == b"\ndata: b\r\n\r\n"
    assert splitter.pending == 0


def test_blank_line_ending_in_cr_is_released_without_waiting() -> None:
    # The LF that may follow only finishes a line end; holding the event for it would
    # hold every event of a CR-only stream until the next one arrived.
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\r") == b"data: a\r\r"
    assert splitter.feed(b"data: b\r") == b""
    assert splitter.feed(b"\r") == b"data: b\r\r"


def test_lf_after_a_released_cr_is_passed_on_at_once() -> None:
    splitter = EventSplitter()
    splitter.feed(b"data: a\r\n\r")
    assert splitter.feed(b"\n") == b"\n"
    assert splitter.feed(b"data: b") == b""
    assert splitter.pending == len(b"data: b")


def test_crlf_after_a_line_is_one_line_end_not_a_blank_line() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r") == b""
    assert splitter.feed(b"\n") == b""
    assert splitter.feed(b"data: b\r\n") == b""
    assert splitter.feed(b"\r\n") == b"data: a\r\ndata: b\r\n\r\n"


@pytest.mark.parametrize("sep", SEPS, ids=SEP_IDS)
def test_blank_lines_between_events_are_forwarded(sep: bytes) -> None:
    stream = sep + b"data: a" + sep + sep + sep
    blocks = run([stream])
    assert b"".join(blocks) == stream
    assert events_of(blocks) == [SSEEvent("a")]


def test_leading_bom_is_dropped() -> None:
    assert run([b"\xef\xbb\xbfdata: a\n\n"]) == [b"data: a\n\n", b""]


def test_leading_bom_split_across_chunks_is_dropped() -> None:
    blocks = run([b"\xef", b"\xbb", b"\xbf", b"data: a\n\n"])
    assert b"".join(blocks) == b"data: a\n\n"


def test_bytes_that_only_start_like_a_bom_are_kept() -> None:
    blocks = run([b"\xef", b"\xbbdata: a\n\n"])
    assert b"".join(blocks) == b"\xef\xbbdata: a\n\n"


def test_bom_after_the_start_of_the_stream_is_kept() -> None:
    stream = b"data: a\n\n\xef\xbb\xbfdata: b\n\n"
    assert b"".join(run([stream])) == stream


def test_incomplete_event_over_the_cap_raises_sse_error() -> None:
    splitter = EventSplitter(max_event_bytes=16)
    splitter.feed(b"data: 0123456789")
    with pytest.raises(SSEError):
        splitter.feed(b"a")


def test_incomplete_event_of_exactly_the_cap_is_held() -> None:
    splitter = EventSplitter(max_event_bytes=16)
    assert splitter.feed(b"data: 0123456789") == b""
    assert splitter.pending == 16


def test_complete_events_do_not_count_toward_the_cap() -> None:
    event = b"data: " + b"x" * 30 + b"\n\n"
    chunk = event * 3 + b"data: 1"
    assert EventSplitter(max_event_bytes=16).feed(chunk) == event * 3


def test_flush_returns_the_incomplete_rest_and_forgets_it() -> None:
    splitter = EventSplitter()
    splitter.feed(b"data: a\n\ndata: b")
    assert splitter.flush() == b"data: b"
    assert splitter.pending == 0
    assert splitter.flush() == b""


def test_flush_returns_a_stream_that_was_only_a_bom_prefix() -> None:
    splitter = EventSplitter()
    splitter.feed(b"\xef\xbb")
    assert splitter.pending == 2
    assert splitter.flush() == b"\xef\xbb"


# Round trip: encode -> any line endings -> any chunking -> split -> parse

_text = st.text(st.characters(codec="utf-8"), max_size=20)
_name = _text.filter(lambda s: not re.search(r"[\r\n]", s))


@st.composite
def _events(draw: st.DrawFn) -> tuple[bytes, SSEEvent | None]:
    """One encoded event (or comment) and what a reader should make of it."""
    if draw(st.booleans()) and draw(st.booleans()):
        return encode_comment(draw(_name)), None
    data = draw(st.none() | _text)
    event = draw(st.none() | _name)
    id_ = draw(st.none() | _name.filter(lambda s: "\0" not in s))
    retry = draw(st.none() | st.integers(0, 10**6))
    raw = encode_event(data, event=event, id=id_, retry=retry)
    if (data, event, id_, retry) == (None, None, None, None):
        return raw, None
    normalised = None if data is None else re.sub(r"\r\n|\r", "\n", data)
    return raw, SSEEvent(normalised, event or None, id_, retry)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(_events(), max_size=8),
    seps=st.lists(st.sampled_from(SEPS), min_size=1, max_size=4),
    bom=st.booleans(),
    data=st.data(),
)
def test_encoded_events_survive_any_line_endings_and_chunking(
    events: list[tuple[bytes, SSEEvent | None]],
    seps: list[bytes],
    bom: bool,
    data: st.DataObject,
) -> None:
    stream = with_endings(b"".join(raw for raw, _ in events), seps)
    head = b"\xef\xbb\xbf" if bom else b""
    whole = head + stream
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=10)))
    chunks = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    blocks = run(chunks)
    assert b"".join(blocks) == stream
    assert blocks[-1] == b""
    assert events_of(blocks) == [e for _, e in events if e is not None]


# Hostile input: arbitrary bytes, arbitrary chunking, a small cap. The splitter is the DoS
# guard in front of every upstream stream, so it must neither crash, lose or invent bytes,
# nor hold more than its cap.

_LINE_END = re.compile(rb"(?:\r\n|\r|\n)\Z")


@settings(max_examples=500, deadline=None)
@given(chunks=st.lists(st.binary(max_size=600), max_size=12), cap=st.integers(1024, 2048))
def test_splitter_on_arbitrary_bytes_keeps_every_byte_or_refuses_within_its_cap(
    chunks: list[bytes], cap: int
) -> None:
    splitter = EventSplitter(cap)
    blocks: list[bytes] = []
    for chunk in chunks:
        try:
            block = splitter.feed(chunk)
        except SSEError:
            assert splitter.pending == 0  # what it held is dropped, not kept growing
            return
        assert splitter.pending <= cap + 3  # + a BOM prefix still being recognised
        if block:
            # A block ends on an event boundary: its last raw event ends in a line end.
            *_, last = iter_events(block)
            assert _LINE_END.search(last), block
        blocks.append(block)
    whole = b"".join(chunks)
    assert b"".join(blocks) + splitter.flush() == whole.removeprefix(b"\xef\xbb\xbf")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_iter_events_and_parse_event_never_fail_and_never_lose_bytes(raw: bytes) -> None:
    events = iter_events(raw)
    assert b"".join(events) == raw
    for e in events:
        parsed = parse_event(e)
        if parsed is not None:
            assert parsed.event is None or not _LINE_BREAK_RE.search(parsed.event)
            assert parsed.id is None or not (_LINE_BREAK_RE.search(parsed.id) or "\0" in parsed.id)
            assert parsed.retry is None or parsed.retry >= 0


_LINE_BREAK_RE = re.compile(r"[\r\n]")


@settings(max_examples=300, deadline=None)
@given(
    data=st.none() | st.text(),
    event=st.none() | st.text(max_size=10),
    id_=st.none() | st.text(max_size=10),
)
def test_encode_event_refuses_exactly_what_would_break_framing(
    data: str | None, event: str | None, id_: str | None
) -> None:
    bad = (event is not None and bool(_LINE_BREAK_RE.search(event))) or (
        id_ is not None and (bool(_LINE_BREAK_RE.search(id_)) or "\0" in id_)
    )
    try:
        raw = encode_event(data, event=event, id=id_)
    except ValueError:
        assert bad
        return
    assert not bad
    (one,) = iter_events(raw)  # one event, however the text was made
    parsed = parse_event(one)
    if parsed is not None:
        assert parsed.id == id_
        assert parsed.event == (event or None)
        assert parsed.data == (None if data is None else re.sub(r"\r\n|\r", "\n", data))
