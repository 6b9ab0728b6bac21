"""Server-Sent Events codec, sans-IO: bytes in, events out.

Framing follows the WHATWG "event stream interpretation"
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end in CRLF, LF or CR (mixed freely), a blank line ends an event, a UTF-8 BOM may open
the stream. `EventSplitter` cuts an upstream byte stream on event boundaries whatever its TCP
chunking, `iter_events` and `parse_event` read those events, `encode_event` and
`encode_comment` write them (LF endings, one event one bytes object).

Nothing here does I/O or imports aiohttp; the relay calls it once per upstream chunk, so the
splitter works with `find`/`rfind` and compiled regexes, never a Python loop per byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "EventSplitter",
    "SSEError",
    "SSEEvent",
    "encode_comment",
    "encode_event",
    "event_start",
    "iter_events",
    "parse_event",
]

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
# One event: non-empty lines, then the blank line. Possessive quantifiers keep the match from
# backtracking into reading the CR of a CRLF as a line end of its own.
_EVENT = re.compile(rb"(?:[^\r\n]++(?:\r\n|\r|\n))*+(?:\r\n|\r|\n)")
_LINE_SEP = re.compile(r"\r\n|\r|\n")
_LINE_BREAK = frozenset("\r\n")


class SSEError(Exception):
    """An incomplete event outgrew the splitter's `max_event_bytes` (a DoS guard)."""


class EventSplitter:
    """Cut a byte stream into blocks of whole events, however the network chunked it.

    `feed` returns the longest prefix of everything fed so far that ends on an event boundary
    (possibly b"") and keeps the rest; the returned blocks concatenate back to the input, minus
    a leading BOM. A blank line ending in CR at the very end of the data is released at once
    rather than held for a possible LF: the event is complete either way, and a following LF
    then opens the next block, where a reader sees it as a harmless empty line. Waiting would
    hold every event of a CR-only stream until the next one arrives.
    """

    __slots__ = ("_buf", "_head", "_max")

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()  # incomplete tail; always starts at a line start
        self._head: bytes | None = b""  # stream start while a BOM may still be arriving

    @property
    def pending(self) -> int:
        """Bytes held back, waiting for the end of their event."""
        return len(self._buf) + len(self._head or b"")

    def feed(self, data: bytes) -> bytes:
        """Take the next chunk; return the newly completed events as one block (maybe b"").

        Raises SSEError (and drops what it held) when the incomplete part exceeds
        `max_event_bytes`.
        """
        if self._head is not None:
            head = self._head + data
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._head = head
                return b""
            self._head = None
            data = head.removeprefix(_BOM)
        return self._split(data) if data else b""

    def flush(self) -> bytes:
        """Return whatever incomplete bytes are left at the end of the stream, and forget them."""
        rest = (self._head or b"") + bytes(self._buf)
        self._buf.clear()
        self._head = None
        return rest

    def _split(self, data: bytes) -> bytes:
        buf = self._buf
        if not buf:
            # Common case: nothing held back. Search `data` itself so that a chunk holding
            # exactly whole events is returned as the very same object.
            cut = _last_boundary(data, 0, at_line_start=True)
            if cut == len(data):
                return data
            buf += data[cut:]
            out = data[:cut]
        else:
            start = len(buf) - 1  # a blank line may begin on the last byte held
            buf += data
            cut = _last_boundary(buf, start, at_line_start=False)
            out = bytes(buf[:cut])
            del buf[:cut]
        if len(buf) > self._max:
            buf.clear()
            raise SSEError(f"SSE event exceeds {self._max} bytes without ending")
        return out


def _last_boundary(s: bytes | bytearray, start: int, *, at_line_start: bool) -> int:
    """End offset of the last blank line in `s` found at or after `start`, else 0."""
    if s.find(b"\r", start) < 0:
        # LF only: a blank line is "\n\n" (the first LF may close a CRLF, still fine).
        i = s.rfind(b"\n\n", start)
        if i >= 0:
            return i + 2
        return 1 if at_line_start and s[:1] == b"\n" else 0
    # Two line ends in a row make a blank line; "\r\n" alone is one line end, so the
    # pairs that prove a blank line are exactly LF LF, CR CR and LF CR. The blank line's
    # own terminator starts at the second byte of the pair.
    j = max(s.rfind(b"\n\n", start), s.rfind(b"\r\r", start), s.rfind(b"\n\r", start)) + 1
    if j == 0 and not (at_line_start and s[:1] in (b"\n", b"\r")):
        return 0  # no blank line (j == 0 also stands for one right at the start)
    if s[j] == _LF:
        return j + 1
    # A CR at the very end is released at once (see the class docstring).
    return j + 2 if j + 1 < len(s) and s[j + 1] == _LF else j + 1


def event_start(block: bytes, pos: int) -> int:
    """Offset at which the event holding `block[pos]` begins, in a block of whole events
    (as `EventSplitter.feed` returns): just after the last blank line before `pos`."""
    return _last_boundary(block[:pos], 0, at_line_start=True)


def iter_events(block: bytes) -> list[bytes]:
    """Split a block of whole events (as `EventSplitter.feed` returns) into raw events.

    Each item keeps its terminating blank line. Trailing bytes that do not end an event
    (only possible for a `flush` leftover) come last, as they are, so nothing is lost.
    """
    events: list[bytes] = []
    pos, end = 0, len(block)
    match = _EVENT.match
    while pos < end:
        m = match(block, pos)
        if m is None:
            events.append(block[pos:])
            break
        events.append(m.group())
        pos = m.end()
    return events


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One parsed event. `data` is None when no `data` field came (the spec then dispatches
    nothing, but `id` and `retry` still apply); `event` is None for the default "message"."""

    data: str | None
    event: str | None = None
    id: str | None = None
    retry: int | None = None


def parse_event(raw: bytes) -> SSEEvent | None:
    """Interpret one raw event (up to its first blank line); None if it holds no field at all."""
    data: list[str] = []
    event: str | None = None
    id_: str | None = None
    retry: int | None = None
    seen = False
    for line in _LINE_SEP.split(raw.decode("utf-8", errors="replace")):
        if not line:
            break
        if line[0] == ":":
            continue  # comment
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value or None  # an empty type means the default, "message"
        elif name == "id":
            if "\0" in value:
                continue  # the spec ignores such an id
            id_ = value
        elif name == "retry":
            if not (value.isascii() and value.isdigit()):
                continue
            retry = int(value)
        else:
            continue  # unknown field
        seen = True
    if not seen:
        return None
    return SSEEvent("\n".join(data) if data else None, event, id_, retry)


def encode_event(
    data: str | None = None,
    *,
    event: str | None = None,
    id: str | int | None = None,  # the SSE field's own name
    retry: int | None = None,
) -> bytes:
    """Encode one event: `id`, `event`, one `data:` line per line of `data`, `retry`.

    Line breaks in `data` (CRLF, CR or LF) become separate `data:` lines, which the reader
    joins back with LF. Raises ValueError for a line break in `event` or `id`, a NUL in `id`
    (readers ignore such ids) or a negative `retry`.
    """
    parts: list[str] = []
    if id is not None:
        id = str(id)
        if _LINE_BREAK.intersection(id) or "\0" in id:
            raise ValueError("SSE id must not contain CR, LF or NUL")
        parts.append(f"id: {id}\n")
    if event is not None:
        if _LINE_BREAK.intersection(event):
            raise ValueError("SSE event name must not contain CR or LF")
        parts.append(f"event: {event}\n")
    if data is not None:
        parts.extend(f"data: {line}\n" for line in _LINE_SEP.split(data))
    if retry is not None:
        if retry < 0:
            raise ValueError("SSE retry must be a non-negative integer")
        parts.append(f"retry: {retry}\n")
    parts.append("\n")
    return "".join(parts).encode()


def encode_comment(text: str = "") -> bytes:
    """Encode a comment such as b": ping\\n\\n" (readers ignore it; it keeps proxies awake)."""
    return "".join(f": {line}\n" for line in _LINE_SEP.split(text)).encode() + b"\n"
