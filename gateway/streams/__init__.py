"""Detached, resumable generations for browsers: /v1/streams.

`log` holds the event-log interface (`EventLog`) and its memory implementation; a shared
backend (Redis) implements the same interface and sits at `app[EVENT_LOG]`.
"""

from .log import Batch, Event, EventLog, MemoryEventLog

__all__ = ["Batch", "Event", "EventLog", "MemoryEventLog"]
