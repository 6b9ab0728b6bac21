"""Usage totals in this process's memory (`[limits] backend = "memory"`)."""

from __future__ import annotations

from dataclasses import replace

from .tap import Usage, UsageTotals


class MemoryUsage:
    """`UsageRecorder` in this process's memory (`[limits] backend = "memory"`)."""

    def __init__(self) -> None:
        self._totals: dict[str, UsageTotals] = {}
        self._streamed: dict[str, int] = {}

    def add(self, client: str, usage: Usage | None, *, streamed: bool) -> None:
        """Record at once (no await, so it is safe anywhere, a cancelled handler included)."""
        t = self._totals.get(client)
        if t is None:
            t = self._totals[client] = UsageTotals()
        t.requests += 1
        if streamed:
            self._streamed[client] = self._streamed.get(client, 0) + 1
        if usage is not None:
            t.prompt_tokens += usage.prompt_tokens
            t.completion_tokens += usage.completion_tokens
            t.total_tokens += usage.total_tokens

    async def record(self, client: str, usage: Usage | None, *, streamed: bool) -> None:
        self.add(client, usage, streamed=streamed)

    async def totals(self, client: str) -> UsageTotals:
        t = self._totals.get(client)
        return UsageTotals() if t is None else replace(t)

    def streamed_requests(self, client: str) -> int:
        return self._streamed.get(client, 0)
