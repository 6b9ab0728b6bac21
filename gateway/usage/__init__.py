"""Usage: what each request cost, and the per-client totals.

- `tap`: sans-IO, finds the usage in a relayed answer (and strips what the gateway asked for);
- `accounting`: records every request when it ends, `GET /v1/usage`;
- `memory` and `redis`: the `UsageRecorder` stores.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from .tap import Usage, UsageTotals


class UsageRecorder(Protocol):
    """Per-client usage totals (memory or Redis).

    `record` is called once per relayed request when it ends (one request, plus its tokens
    when `usage` is not None). It is called from a task the accounting hook owns, never from
    a cancelled handler, so it may await I/O; the app waits for pending records at cleanup.
    """

    async def record(self, client: str, usage: Usage | None, *, streamed: bool) -> None: ...

    async def totals(self, client: str) -> UsageTotals:
        """The client's totals; all zero for a client never recorded."""
        ...


USAGE = web.AppKey("usage", UsageRecorder)
