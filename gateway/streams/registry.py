"""The app owns detached generations: a registry of their tasks, and their lifetime.

`streams_ctx` (a cleanup context) installs the task registry (the event log is installed by
`gateway.backends`); at shutdown it gives running generations
`shutdown_grace` seconds to finish, then cancels the rest (each ends its log with `fail`).

Under SIGTERM (`process.drain`) a generation counts as work in flight like a request, so the
drain's grace waits for it too, and at the drain's deadline the rest are cancelled: their
readers get the `fail` event and a clean end; with a shared backend the log stays readable
(resumable up to that event) from any instance until `resume_ttl`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from aiohttp import web

from ..process.drain import DRAIN, Drain
from ..state import CONFIG

STREAM_TASKS: web.AppKey[StreamTasks] = web.AppKey("stream_tasks")

class StreamTasks:
    """The running generations of this process."""

    def __init__(self, drain: Drain | None = None) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._drain = drain

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._drain is not None:
            self._drain.enter()
            task.add_done_callback(self._left)
        return task

    def _left(self, _task: asyncio.Task[None]) -> None:
        if self._drain is not None:
            self._drain.leave()

    async def cancel_all(self) -> None:
        """The drain's deadline: end every generation now (each writes its `fail`)."""
        await self.stop(0)

    async def stop(self, grace: float) -> None:
        """Wait up to `grace` seconds for the generations, then cancel and await the rest."""
        if self._tasks and grace > 0:
            await asyncio.wait(set(self._tasks), timeout=grace)
        # One turn of the loop first: a task created in this turn (a create handing over its
        # generation) has not taken its first step, and cancelled now its body would never
        # run: no `fail` event, the slot and the upstream response it was handed never freed.
        await asyncio.sleep(0)
        rest = set(self._tasks)
        for task in rest:
            task.cancel()
        if rest:
            await asyncio.gather(*rest, return_exceptions=True)


async def streams_ctx(app: web.Application) -> AsyncIterator[None]:
    drain = app[DRAIN] if DRAIN in app else None
    tasks = app[STREAM_TASKS] = StreamTasks(drain)
    if drain is not None:
        drain.on_deadline("detached streams", tasks.cancel_all)
    yield
    await tasks.stop(app[CONFIG].server.shutdown_grace)
