"""A whole body read under a cap: a client's request, an upstream's answer.

`StreamReader.read(n)` answers with what is buffered, not n bytes, and `request.read()`
keeps what it returns on the request for the request's life: both readers here read until
the end with `readany()` and refuse as soon as the bytes pass the cap.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import StreamReader


async def read_capped(
    content: StreamReader, cap: int, too_large: Callable[[], Exception]
) -> bytes:
    """Everything `content` holds until its end, at most `cap` bytes (more: `too_large()`)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > cap:
            raise too_large()
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
