"""`gateway serve`, exactly, plus one probe for the soak: on SIGUSR1 the process writes its
live asyncio tasks to stderr as one JSON line, so the driver can compare before and after.

    python -m tests.soak.serve_probe --config PATH
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections import Counter
from types import FrameType

from gateway.cli import main


def _task_name(task: asyncio.Task[object]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", type(coro).__name__)


def _dump_tasks(signum: int, frame: FrameType | None) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    names = Counter(_task_name(t) for t in tasks)
    sys.stderr.write(json.dumps({"probe": "tasks", "count": len(tasks), "names": names}) + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _dump_tasks)
    sys.exit(main(["serve", *sys.argv[1:]]))
