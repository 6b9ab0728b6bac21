"""`EventLog` on Redis Streams: a detached stream can be read and resumed on any instance.

Per stream id, three keys (`gw:s:{<id>}:` + m, l, o; the braces are a hash tag, so on a
Redis Cluster the three share one hash slot and every script below may touch them together):

- `m`, a hash: `n` the last event id, `bytes` the data held, `end` the final event's id (0
  while running). Its existence is the stream's existence.
- `l`, a Redis Stream holding the events, entry id `<n>-0` for event n, so "after N" is
  `XRANGE (N+1)-0 +` or `XREAD BLOCK ... N-0`. XADD carries `MAXLEN` = the event bound.
- `o`, the owner's lease: set by `create` with a `lease_ttl` expiry and renewed by the owning
  process every `lease_ttl / 3` while the generation runs.

Appending, cancelling and ending are Lua scripts, so the bounds and "the final event is
last" hold across processes. Every end is published on one channel (`gw:s:ended`); each
process subscribes (on a cluster, a classic PUBLISH reaches the subscribers of every node), so
a DELETE on any instance reaches the owner's `wait_ended` at once;
the renewal loop doubles as a poll in case a message was missed while reconnecting.

The end of a log this process is appending to is learnt from the append's own reply: the
owner's final append publishes the end, and the pub/sub message (on another connection) can
arrive before the reply. An end heard from the channel or the renewal while an append is in
flight is therefore held until that append has answered (`_appending`): a finished generation
is never taken for a cancelled one, and a real DELETE still ends it right after.

A reader that waits and finds neither new events nor the owner's lease (the owning process
died) ends the log itself with a `fail` event, atomically, so every reader sees that same
event with the same id instead of waiting forever.

While running, `m` and `l` expire `resume_ttl + lease_ttl` after the last renewal (a dead
owner's log is freed even if no reader comes); once ended, `resume_ttl` after the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from redis.exceptions import RedisError

from ..errors import error_body
from ..redisconn import RedisConnection, RedisUnavailable
from .log import CANCELLED_DATA, DONE, FAIL, FINAL_KINDS, OVERFLOW_DATA, Batch, Event

log = structlog.get_logger("gateway.redis")

PREFIX = "gw:s:"
CHANNEL = "gw:s:ended"
OWNER_LOST_DATA = error_body(
    "The gateway instance running this stream stopped", "server_error", "stream_owner_lost"
).decode()

# KEYS m, l, o. The final event: added, the log ended and set to expire, the owner's lease
# dropped, the end published.
_FINISH = """
local function finish(n, kind, data, ttl, channel, id)
  redis.call('XADD', KEYS[2], n .. '-0', 'k', kind, 'd', data)
  redis.call('HSET', KEYS[1], 'n', n, 'end', n)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('DEL', KEYS[3])
  redis.call('PUBLISH', channel, id)
end
"""

# ARGV running_ttl_ms, lease_ms.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'n', 0, 'bytes', 0, 'end', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], 1, 'PX', ARGV[2])
return 1
"""

# ARGV kind, data, max_events, max_bytes, end_ttl_ms, channel, id, overflow_data.
# Returns the event id, or 0 when the log is gone, ended, or ended now by overflow.
_APPEND = (
    _FINISH
    + """
local st = redis.call('HMGET', KEYS[1], 'n', 'bytes', 'end')
if not st[1] or tonumber(st[3]) > 0 then return 0 end
local n, bytes = tonumber(st[1]) + 1, tonumber(st[2]) + #ARGV[2]
local kind = ARGV[1]
if kind == 'done' or kind == 'fail' then
  finish(n, kind, ARGV[2], ARGV[5], ARGV[6], ARGV[7])
  return n
end
-- The last slot is kept for the final event, so a log always ends with done/fail.
if n >= tonumber(ARGV[3]) or bytes > tonumber(ARGV[4]) then
  finish(n, 'fail', ARGV[8], ARGV[5], ARGV[6], ARGV[7])
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], n .. '-0', 'k', kind, 'd', ARGV[2])
redis.call('HSET', KEYS[1], 'n', n, 'bytes', bytes)
if n == 1 then redis.call('PEXPIRE', KEYS[2], redis.call('PTTL', KEYS[1])) end
return n
"""
)

# ARGV kind, data, end_ttl_ms, channel, id, only_if_ownerless.
# Returns 0 unknown, 1 ended (now or before), 2 not ended because the owner is alive.
_END = (
    _FINISH
    + """
local st = redis.call('HMGET', KEYS[1], 'n', 'end')
if not st[1] then return 0 end
if tonumber(st[2]) > 0 then return 1 end
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
finish(tonumber(st[1]) + 1, ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return 1
"""
)

# KEYS m, l, o per stream; ARGV lease_ms, running_ttl_ms, then 1/0 per stream: renew its
# lease (owned here) or only look. Returns per stream 0 gone, 1 ended, 2 running.
_RENEW = """
local out = {}
for i = 1, #KEYS, 3 do
  local st = redis.call('HMGET', KEYS[i], 'n', 'end')
  if not st[1] then out[#out + 1] = 0
  elseif tonumber(st[2]) > 0 then out[#out + 1] = 1
  else
    if ARGV[2 + (i + 2) / 3] == '1' then
      redis.call('SET', KEYS[i + 2], 1, 'PX', ARGV[1])
      redis.call('PEXPIRE', KEYS[i], ARGV[2])
      redis.call('PEXPIRE', KEYS[i + 1], ARGV[2])
    end
    out[#out + 1] = 2
  end
end
return out
"""


# KEYS m, l; ARGV first entry id, count. Returns {end or false, entries}: one call (and one
# slot), where a MULTI would need a transaction across a cluster's pipeline.
_READ = """
local fin = redis.call('HGET', KEYS[1], 'end')
if not fin then return {false, {}} end
return {fin, redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])}
"""


def _keys(stream_id: str) -> list[str]:
    base = PREFIX + "{" + stream_id + "}:"
    return [base + "m", base + "l", base + "o"]


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _events(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[Event]:
    return [
        Event(int(eid.split(b"-", 1)[0]), f[b"k"].decode(), f[b"d"].decode()) for eid, f in entries
    ]


class RedisEventLog:
    """`gateway.streams.EventLog` shared through Redis (see the module docstring)."""

    def __init__(
        self,
        conn: RedisConnection,
        *,
        max_events: int,
        max_bytes: int,
        ttl: float,
        lease_ttl: float,
    ) -> None:
        self._conn = conn
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.end_ttl_ms = max(1, int(ttl * 1000))
        self.lease_ttl = lease_ttl
        self.lease_ms = max(1, int(lease_ttl * 1000))
        self.running_ttl_ms = self.end_ttl_ms + self.lease_ms
        r = conn.cmd
        self._create = r.register_script(_CREATE)
        self._append = r.register_script(_APPEND)
        self._end = r.register_script(_END)
        self._renew = r.register_script(_RENEW)
        self._range = r.register_script(_READ)
        self._owned: set[str] = set()  # streams whose generation runs in this process
        self._ended: dict[str, asyncio.Event] = {}  # streams someone here awaits the end of
        # Streams with an append in flight here -> whether an end was heard meanwhile.
        self._appending: dict[str, bool] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the end-listener (pub/sub) and the lease renewer."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(), name="redis-streams-listen"),
            loop.create_task(self._renew_loop(), name="redis-streams-renew"),
        ]

    async def close(self) -> None:
        self._closed = True  # see RedisConnection.close: a cancel can be swallowed on 3.11
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Owned generations that did not end: their leases lapse and readers end them.
        for ev in self._ended.values():
            ev.set()

    def _error(self, exc: BaseException, what: str) -> None:
        self._conn.command_failed(what, exc)

    def _heard_end(self, stream_id: str) -> None:
        """An end learnt from the channel or a renewal, not from an append's reply."""
        if stream_id in self._appending:
            self._appending[stream_id] = True  # decided when the append answers
        else:
            self._mark_ended(stream_id)

    def _mark_ended(self, stream_id: str) -> None:
        self._owned.discard(stream_id)
        ev = self._ended.pop(stream_id, None)
        if ev is not None:
            ev.set()

    # ------------------------------------------------------------------ EventLog

    async def create(self, stream_id: str) -> None:
        try:
            self._conn.check()
            created = await self._create(
                keys=_keys(stream_id), args=[self.running_ttl_ms, self.lease_ms]
            )
        except (RedisError, OSError) as exc:
            self._error(exc, "create")
            raise RedisUnavailable(
                "Detached streams are unavailable: Redis is unreachable"
            ) from exc
        if not created:
            raise ValueError("stream id already in use")
        self._owned.add(stream_id)

    async def append(self, stream_id: str, kind: str, data: str) -> int | None:
        args: list[str | int] = [
            kind,
            data,
            self.max_events,
            self.max_bytes,
            self.end_ttl_ms,
            CHANNEL,
            stream_id,
            OVERFLOW_DATA,
        ]
        self._appending[stream_id] = False
        try:
            self._conn.check()
            n = int(await self._append(keys=_keys(stream_id), args=args))
        except (RedisError, OSError) as exc:
            # Nobody could read what follows: the owner stops (its relay to Redis is cut).
            self._error(exc, "append")
            log.warning("stream_append_failed", stream=stream_id[:8])
            self._mark_ended(stream_id)
            return None
        finally:
            if self._appending.pop(stream_id, False):
                self._mark_ended(stream_id)  # someone else ended it (a DELETE) meanwhile
        if n == 0 or kind in FINAL_KINDS:
            self._mark_ended(stream_id)  # ended by this append
        return n or None

    async def read(
        self, stream_id: str, after: int, *, timeout: float, limit: int = 1000
    ) -> Batch | None:
        """See `EventLog.read`. Redis unreachable: a first look (`timeout` 0) raises
        `RedisUnavailable` (503); a reader already following keeps waiting, retrying until
        its timeout, and gets "nothing yet": its connection stays open (heartbeats go on) and
        it resumes when Redis is back, or learns the stream is gone (None)."""
        after = max(after, 0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._conn.check()
                return await self._read(stream_id, after, deadline, limit)
            except (RedisError, OSError) as exc:
                self._error(exc, "read")
                left = deadline - time.monotonic()
                if timeout <= 0:
                    raise RedisUnavailable(
                        "Detached streams are unavailable: Redis is unreachable"
                    ) from exc
                if left <= 0:
                    return Batch([], False)
                await asyncio.sleep(min(left, self._conn.interval))

    async def _read(self, stream_id: str, after: int, deadline: float, limit: int) -> Batch | None:
        meta, events_key, _owner = keys = _keys(stream_id)
        while True:
            end, entries = await self._range(
                keys=[meta, events_key], args=[f"{after + 1}-0", limit]
            )
            if end is None:
                return None
            events = _events([(eid, _pairs(fields)) for eid, fields in entries])
            last = events[-1].id if events else after
            ended = int(end) > 0 and last >= int(end)
            left = deadline - time.monotonic()
            if events or ended or left <= 0:
                return Batch(events, ended)
            # Wait for the next event, in slices no longer than the owner's lease.
            block = max(1, int(min(left, self.lease_ttl) * 1000))
            got = await self._conn.block.xread({events_key: f"{after}-0"}, count=1, block=block)
            if not got:
                # Silence for a while: is the owner still there? If not, end the log.
                args: list[str | int] = [
                    FAIL,
                    OWNER_LOST_DATA,
                    self.end_ttl_ms,
                    CHANNEL,
                    stream_id,
                    "1",
                ]
                await self._end(keys=keys, args=args)

    async def cancel(self, stream_id: str) -> bool:
        args: list[str | int] = [DONE, CANCELLED_DATA, self.end_ttl_ms, CHANNEL, stream_id, "0"]
        try:
            self._conn.check()
            known = int(await self._end(keys=_keys(stream_id), args=args))
        except (RedisError, OSError) as exc:
            self._error(exc, "cancel")
            raise RedisUnavailable(
                "Detached streams are unavailable: Redis is unreachable"
            ) from exc
        if known:
            self._mark_ended(stream_id)
        return known != 0

    async def delete(self, stream_id: str) -> bool:
        if not await self.cancel(stream_id):  # published: the owner, wherever, stops
            return False
        try:
            await self._conn.cmd.delete(*_keys(stream_id))
        except (RedisError, OSError) as exc:
            self._error(exc, "delete")
            raise RedisUnavailable(
                "Detached streams are unavailable: Redis is unreachable"
            ) from exc
        return True

    async def wait_ended(self, stream_id: str) -> None:
        ev = self._ended.get(stream_id)
        if ev is None:
            ev = self._ended[stream_id] = asyncio.Event()
            # Registered first, then checked: an end published in between is not lost.
            try:
                state = await self._renew(
                    keys=_keys(stream_id), args=[self.lease_ms, self.running_ttl_ms, "0"]
                )
            except (RedisError, OSError) as exc:
                self._error(exc, "wait_ended")  # the renew loop keeps looking
            else:
                if state[0] != 2:
                    self._heard_end(stream_id)
        await ev.wait()

    # ------------------------------------------------------------------ background

    async def _listen(self) -> None:
        """Learn of every end (a DELETE on any instance) from the channel, reconnecting."""
        while not self._closed:
            pubsub = self._conn.block.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                while not self._closed:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg["type"] == "message":
                        sid = msg["data"].decode()
                        if sid in self._ended or sid in self._owned:
                            self._heard_end(sid)
            except (RedisError, OSError) as exc:
                self._error(exc, "subscribe")
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(self._conn.interval)

    async def _renew_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.lease_ttl / 3)
            await self.renew()

    async def renew(self) -> None:
        """Renew the leases of owned streams and look at awaited ones (one round trip)."""
        ids = list(self._owned | self._ended.keys())
        if not ids:
            return
        # One call for all of them; on a cluster one call per hash slot.
        for group in self._conn.same_slot([_keys(sid)[0] for sid in ids]):
            some = [ids[i] for i in group]
            keys = [k for sid in some for k in _keys(sid)]
            flags = ["1" if sid in self._owned else "0" for sid in some]
            try:
                states = await self._renew(
                    keys=keys, args=[self.lease_ms, self.running_ttl_ms, *flags]
                )
            except (RedisError, OSError) as exc:
                self._error(exc, "renew")
                return
            for sid, state in zip(some, states, strict=True):
                if state != 2:
                    self._heard_end(sid)
