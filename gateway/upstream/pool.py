"""The upstream side: which upstream serves a model, and opening a response from it.

This is the one boundary where aiohttp's client errors become the gateway's error tree.
`UpstreamPool.open()` returns a `ClientResponse` whose headers have arrived, after the
retries the config allows; everything before that point can still be retried, nothing
after it is (the caller starts writing to the client once it holds the response).
"""

from __future__ import annotations

import asyncio
import email.utils
import fnmatch
import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..aiohttp_seams import bytes_received, fail_body, on_connection_release, unread_bytes
from ..bodies import read_capped
from ..config import NEVER_PASSED, BreakerConfig, Config, UpstreamConfig
from ..errors import (
    GatewayError,
    NotFound,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
    retry_after_value,
)
from ..exchange import Exchange
from ..ticker import EARLY, Ticker, tick_period
from .breaker import Admission, Breaker, Transition

if TYPE_CHECKING:
    from ..metrics import Metrics

log = structlog.get_logger("gateway.upstream")

# Upstream answers worth another try (elsewhere or later); 429 does not open a breaker.
UPSTREAMS: web.AppKey[UpstreamPool] = web.AppKey("upstreams")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})

# The client request headers an upstream gets: an allow-list, never "all but a deny-list"
# (a header like X-Original-URL or X-HTTP-Method-Override means something to some servers).
# traceparent and X-Request-ID are the gateway's own, set in `UpstreamPool.open`.
FORWARDED = frozenset(
    {"accept", "content-type", "openai-beta", "idempotency-key", "traceparent", "x-request-id"}
)
# Which account the upstream bills: only to an upstream configured to take them.
ACCOUNT = frozenset({"openai-organization", "openai-project"})


def forward_headers(incoming: Mapping[str, str]) -> CIMultiDict[str]:
    """The client's headers that some upstream may take (`Upstream.outgoing` picks per upstream).

    Credentials and hop-by-hop headers never leave here, so a detached generation holding
    these for its life holds no credential.
    """
    out: CIMultiDict[str] = CIMultiDict()
    # Headers the client named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    hop = {t.strip().lower() for t in incoming.get("Connection", "").split(",")}
    for name, value in incoming.items():
        low = name.lower()
        if low not in hop and low not in NEVER_PASSED:
            out.add(name, value)
    return out


@dataclass(slots=True)
class Upstream:
    """One configured upstream with everything derived from its config built once."""

    cfg: UpstreamConfig
    base: URL
    auth: str | None
    timeout: aiohttp.ClientTimeout
    stream_timeout: aiohttp.ClientTimeout  # a stream's idle and total limits: `Watchdog`
    breaker: Breaker
    slots: asyncio.Semaphore  # max_connections responses in flight at once
    passed: frozenset[str]  # header names (lower case) this upstream takes from the client
    pass_pattern: re.Pattern[str] | None  # `pass_headers` patterns, compiled once
    any_model: bool  # `models` holds "*": no pattern to try per request

    @classmethod
    def from_config(cls, cfg: UpstreamConfig, breaker: BreakerConfig | None = None) -> Upstream:
        breaker = breaker or BreakerConfig()
        return cls(
            cfg=cfg,
            breaker=Breaker(breaker.failure_threshold, breaker.cooldown),
            slots=asyncio.Semaphore(cfg.max_connections),
            passed=FORWARDED | ACCOUNT if cfg.forward_openai_headers else FORWARDED,
            pass_pattern=(
                re.compile("|".join(fnmatch.translate(p) for p in cfg.pass_headers))
                if cfg.pass_headers
                else None
            ),
            any_model="*" in cfg.models,
            base=cfg.base_url,
            auth=f"Bearer {cfg.api_key}" if cfg.api_key else None,
            # No 300 s default total: streams may be long. sock_read is the idle limit between
            # two reads (it also bounds the wait for headers; first_byte_timeout does too).
            timeout=aiohttp.ClientTimeout(
                total=cfg.total_timeout,
                sock_connect=cfg.connect_timeout,
                sock_read=cfg.idle_timeout,
            ),
            stream_timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout),
        )

    @property
    def name(self) -> str:
        return self.cfg.name

    def outgoing(self, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        """The request headers sent to this upstream: its allow-list of `headers`, its key."""
        out: CIMultiDict[str] = CIMultiDict()
        passed, pattern = self.passed, self.pass_pattern
        for name, value in headers.items():
            low = name.lower()
            if low in passed or (
                pattern is not None and low not in NEVER_PASSED and pattern.match(low)
            ):
                out.add(name, value)
        if self.auth is not None:
            out["Authorization"] = self.auth
        return out

    def url(self, path: str) -> URL:
        """`path` (already percent-encoded, from quoted parts) under the base URL's path."""
        return self.base.with_path(self.base.raw_path.rstrip("/") + path, encoded=True)

    def serves(self, model: str | None) -> bool:
        if model is None or self.any_model:
            return True
        return any(fnmatch.fnmatchcase(model, p) for p in self.cfg.models)


class UpstreamPool:
    """Chooses upstreams for a model and opens responses from them, with retries.

    Per-upstream connection limit: the app has one ClientSession whose connector pools
    connections by host, so two upstreams on one host would share a `limit_per_host`. Each
    upstream therefore holds an `asyncio.Semaphore(max_connections)` for the life of every
    response it serves: taken before the request is sent, given back when the response's
    connection is released or closed (the relay always does one of the two).
    """

    def __init__(
        self,
        cfg: Config,
        session: aiohttp.ClientSession,
        metrics: Metrics | None = None,
        ticker: Ticker | None = None,
    ) -> None:
        self.session = session
        # Streams' watchdogs (the app's one ticker; a pool of its own, when used alone)
        self.ticker = ticker if ticker is not None else Ticker(tick_period(cfg))
        self.retry = cfg.retry
        self.metrics = metrics
        self.upstreams = [Upstream.from_config(u, cfg.breaker) for u in cfg.upstreams]
        if metrics is not None:
            metrics.bind_upstreams([u.name for u in self.upstreams])

    def prepare_reload(self, cfg: Config) -> Callable[[], None]:
        """SIGHUP: the new upstream list, retry policy and breaker settings.

        An upstream kept under the same name and URL keeps its breaker's state (a failing
        upstream stays avoided) and, with the same max_connections, its connection slots.
        Requests already sent keep the upstream they hold.
        """
        kept = {(u.name, u.base): u for u in self.upstreams}
        upstreams = []
        for ucfg in cfg.upstreams:
            fresh = Upstream.from_config(ucfg, cfg.breaker)
            old = kept.get((ucfg.name, ucfg.base_url))
            if old is not None:
                fresh.breaker = old.breaker
                if old.cfg.max_connections == ucfg.max_connections:
                    fresh.slots = old.slots
            upstreams.append(fresh)
        added = [u.name for u in upstreams if u.name not in {o.name for o in self.upstreams}]

        def commit() -> None:
            for u in upstreams:
                u.breaker.threshold = cfg.breaker.failure_threshold
                u.breaker.cooldown = cfg.breaker.cooldown
            if self.metrics is not None and added:
                self.metrics.bind_upstreams(added)
            self.upstreams, self.retry = upstreams, cfg.retry

        return commit

    def candidates(self, model: str | None) -> list[Upstream]:
        """Upstreams serving `model`: by priority, then a weighted shuffle among equals."""
        found = [u for u in self.upstreams if u.serves(model)]
        if len(found) < 2:  # nothing to order (the common one-upstream setup)
            return found
        # Weighted random order (Efraimidis-Spirakis): key = U^(1/w), larger first.
        keyed = [
            (u.cfg.priority, -(random.random() ** (1.0 / u.cfg.weight)), i, u)
            for i, u in enumerate(found)
        ]
        keyed.sort()
        return [k[3] for k in keyed]

    async def open(
        self,
        method: str,
        path: str,
        *,
        ex: Exchange,
        body: bytes | None,
        headers: CIMultiDict[str],
    ) -> tuple[Upstream, aiohttp.ClientResponse]:
        """Send the request and return the first response worth relaying.

        Tries up to `retry.attempts` times in all, walking the candidates in order and
        skipping upstreams whose breaker is open. Nothing has been written to the client when
        this returns or raises, so every try here is safe to repeat.
        """
        order = self.candidates(ex.model)
        if not order:
            raise NotFound(f"The model `{ex.model}` does not exist", code="model_not_found")
        loop = asyncio.get_running_loop()
        if not any(u.breaker.would_allow(loop.time()) for u in order):
            if ex.otel is not None:
                ex.otel.breaker_refused(",".join(u.name for u in order))
            raise self._unavailable(order, loop.time())
        headers["traceparent"] = ex.traceparent
        headers["X-Request-ID"] = ex.request_id
        if body is not None:
            headers["Content-Type"] = "application/json"
        last_exc: GatewayError | None = None
        last: tuple[Upstream, aiohttp.ClientResponse] | None = None  # a retryable answer
        prev: Upstream | None = None
        # Chosen, breaker slot taken, not yet attempted.
        picked: tuple[Upstream, Admission] | None = None
        cursor = 0
        attempts = self.retry.attempts
        try:
            for attempt in range(attempts):
                choice = self._pick(order, cursor, loop.time(), ex)
                if choice is None:
                    break  # every breaker is open now: relay the last answer or error
                chosen, admitted, cursor = choice
                picked = (chosen, admitted)
                if attempt:
                    if self.metrics is not None:
                        self.metrics.retries.inc()
                    if ex.otel is not None:
                        ex.otel.retry(attempt, picked[0].name)
                    # Failing over to another upstream goes at once; the same one waits.
                    if picked[0] is prev:
                        await self._sleep_before_retry(picked[0], attempt, last)
                if last is not None:
                    _discard(last[1])
                    last = None
                (up, admission), picked = picked, None
                prev = up
                ex.attempts = attempt + 1
                ex.upstream = up.name
                final = attempt == attempts - 1
                if ex.otel is not None:  # this try's own span names it upstream
                    headers["traceparent"] = ex.otel.attempt(
                        up.name, up.base, ex, method, path, loop.time()
                    )
                try:
                    resp = await self._attempt(
                        up, admission, method, path, body, headers, loop, ex.stream
                    )
                except GatewayError as exc:
                    if ex.otel is not None:
                        ex.otel.failed(exc)
                    last_exc = exc
                    continue
                if ex.otel is not None:
                    ex.otel.answered(resp.status)
                if resp.status not in RETRYABLE_STATUS or final:
                    return up, resp
                last = (up, resp)
        except BaseException:
            # Cancelled (the client left) between tries: give back what this request held.
            if picked is not None:
                picked[0].breaker.abandon(picked[1])
            if last is not None:
                _discard(last[1])
            raise
        if last is not None:
            return last  # retries exhausted on upstream answers: relay the last one as sent
        if last_exc is None:  # pragma: no cover - open() found an allowed upstream first
            raise self._unavailable(order, loop.time())
        try:
            raise last_exc
        finally:
            # Else this frame holds the exception whose traceback holds this frame: a cycle
            # keeping the request's body until the collector's next (rare) run.
            last_exc = None

    def _pick(
        self, order: list[Upstream], cursor: int, now: float, ex: Exchange | None = None
    ) -> tuple[Upstream, Admission, int] | None:
        """The next candidate from `cursor` on (wrapping) whose breaker lets a request in."""
        n = len(order)
        for step in range(n):
            i = (cursor + step) % n
            up = order[i]
            allowed, change = up.breaker.allow(now)
            if change is not None:
                self._changed(up, change)
            if allowed:
                return up, allowed, (i + 1) % n
            if ex is not None and ex.otel is not None:
                ex.otel.breaker_refused(up.name)
        return None

    async def _attempt(
        self,
        up: Upstream,
        admission: Admission,
        method: str,
        path: str,
        body: bytes | None,
        headers: CIMultiDict[str],
        loop: asyncio.AbstractEventLoop,
        stream: bool,
    ) -> aiohttp.ClientResponse:
        """One try at one upstream, with its verdict given to the breaker and the metrics."""
        try:
            resp = await self._send(up, method, path, body, headers, stream)
        except SlotsBusy:
            # Nothing was sent: our own max_connections were all in use, which says nothing
            # of the upstream's health (a healthy one serving long streams fills them).
            up.breaker.abandon(admission)
            raise
        except UpstreamTimeout:
            self._verdict(up, admission, "timeout", loop.time())
            raise
        except GatewayError:
            self._verdict(up, admission, "connect_error", loop.time())
            raise
        except BaseException:
            # Cancelled (the client left): no verdict on the upstream.
            up.breaker.abandon(admission)
            raise
        if resp.status == 429:
            self._verdict(up, admission, "throttled", loop.time())
        elif resp.status >= 500:
            self._verdict(up, admission, "server_error", loop.time())
        else:
            self._verdict(up, admission, "ok", loop.time())
        return resp

    def _verdict(self, up: Upstream, admission: Admission, outcome: str, now: float) -> None:
        if self.metrics is not None:
            self.metrics.attempt(up.name, outcome)
        if outcome == "ok":
            change = up.breaker.success()
        elif outcome == "throttled":
            # 429: busy, not broken; retried but never opens a breaker.
            up.breaker.abandon(admission)
            change = None
        else:
            change = up.breaker.failure(now)
        if change is not None:
            self._changed(up, change)

    def _changed(self, up: Upstream, change: Transition) -> None:
        old, new = change
        log.warning(
            "breaker_state",
            upstream=up.name,
            old=old.name.lower(),
            new=new.name.lower(),
            cooldown=up.breaker.cooldown,
        )
        if self.metrics is not None:
            self.metrics.breaker(up.name, int(new))

    def _unavailable(self, order: list[Upstream], now: float) -> Unavailable:
        wait = min(u.breaker.opened_at + u.breaker.cooldown - now for u in order)
        return Unavailable(
            "No upstream is available for this model right now (circuit open)",
            code="upstream_unavailable",
            headers={"Retry-After": retry_after_value(wait)},
        )

    async def _sleep_before_retry(
        self, up: Upstream, attempt: int, last: tuple[Upstream, aiohttp.ClientResponse] | None
    ) -> None:
        delay = self._backoff(attempt - 1)
        if last is not None and last[0] is up:
            hinted = retry_after_seconds(last[1].headers.get("Retry-After"))
            if hinted is not None:
                delay = min(self.retry.backoff_max, hinted)
        if delay > 0:
            await asyncio.sleep(delay)

    def _backoff(self, retry: int) -> float:
        """Exponential backoff with full jitter: uniform(0, min(max, initial * 2**retry)).

        https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/
        """
        cap = min(self.retry.backoff_max, self.retry.backoff_initial * (2**retry))
        return random.uniform(0, cap)

    async def _send(
        self,
        up: Upstream,
        method: str,
        path: str,
        body: bytes | None,
        headers: CIMultiDict[str],
        stream: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send one request; `stream`: asked for a stream, whose answer's idle and total
        limits a `Watchdog` keeps instead of aiohttp's per-chunk timer."""
        url = up.url(path)
        sent = up.outgoing(headers)
        slotted = False
        loop = asyncio.get_running_loop()
        try:
            # first_byte_timeout bounds the wait for a connection slot too.
            async with asyncio.timeout(up.cfg.first_byte_timeout):
                await up.slots.acquire()
                slotted = True
                deadline = loop.time() + up.cfg.total_timeout  # from the send, as aiohttp's
                try:
                    # A redirect is relayed as sent, never followed: following it would
                    # carry the upstream's key wherever the Location points.
                    resp = await self.session.request(
                        method,
                        url,
                        data=body,
                        headers=sent,
                        timeout=up.stream_timeout if stream else up.timeout,
                        allow_redirects=False,
                    )
                except BaseException:
                    up.slots.release()
                    raise
        except TimeoutError as exc:
            if not slotted:
                raise SlotsBusy(f"upstream {up.name} timed out (its connections busy)") from exc
            raise UpstreamTimeout(f"upstream {up.name} timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream {up.name} is unreachable") from exc
        release = up.slots.release
        if stream:  # the watchdog stops with the connection, then gives the slot back
            dog = Watchdog(resp, up.cfg.idle_timeout, deadline, self.ticker, release, loop.time())
            release = dog.release
        if not on_connection_release(resp, release):
            release()  # the whole body was read already and the connection went back
        return resp


class Watchdog:
    """A streamed answer's idle and total limits, checked on the app's `Ticker`.

    aiohttp's own (`ClientTimeout.sock_read`, `.total`) hold two timers per stream and
    re-arm one on every chunk that arrives (2.8 us a chunk, for a stream of a thousand
    tokens). A stream request goes without them (`Upstream.stream_timeout`); each tick
    (at most an eighth of `idle` apart, `ticker.tick_period`), when no body byte arrived for
    `idle` while none waited to be read, or the answer ran past `deadline`, fails the
    pending read with TimeoutError: the reader ends the stream `upstream_timeout` (or
    answers 504) as it did on aiohttp's.
    `release()` (when the response's connection is released or closed) stops it and calls
    `then`.
    """

    __slots__ = ("_deadline", "_idle", "_last", "_resp", "_seen", "_then", "_ticker", "stopped")

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        idle: float,
        deadline: float,
        ticker: Ticker,
        then: Callable[[], None],
        now: float,
    ) -> None:
        self._resp = resp
        self._then = then
        self._idle = idle
        self._deadline = deadline
        self._ticker = ticker
        self._last = now  # when bytes were last seen to have arrived
        self._seen = bytes_received(resp)
        self.stopped = False
        ticker.add(self)

    def _stop(self) -> None:
        self.stopped = True
        self._ticker.discard(self)

    def tick(self, now: float) -> None:
        if self._resp.content.exception() is not None:
            # The body failed already (the upstream dropped it, the drain ended it): that is
            # what its reader must hear, not a timeout on top.
            self._stop()
            return
        seen = bytes_received(self._resp)
        # Bytes waiting for the reader (a slow client: aiohttp stops reading the upstream
        # while they wait) are no silence of the upstream's.
        if seen != self._seen or unread_bytes(self._resp):
            self._seen, self._last = seen, now
        if now - self._last >= self._idle - EARLY or now >= self._deadline - EARLY:
            self._stop()
            fail_body(self._resp, TimeoutError("upstream timed out"))

    def release(self) -> None:
        self._stop()
        self._then()


class SlotsBusy(UpstreamTimeout):
    """No connection slot of the upstream's `max_connections` came free within its
    first_byte_timeout (504): nothing was sent, so no verdict on the upstream."""


class AnswerTooLarge(UpstreamError):
    """An upstream body longer than the cap its reader set (502)."""


# The largest upstream error body read to find its error object.
MAX_ERROR_BYTES = 64 << 10


async def error_object(resp: aiohttp.ClientResponse, api_key: str) -> bytes | None:
    """The OpenAI error an upstream answered, as `{"error": {...}}` without our key in it
    (some upstreams quote the credential they were sent); None when it sent none (not JSON,
    no error object, cut, timed out, or over `MAX_ERROR_BYTES`)."""
    try:
        obj = orjson.loads(await read_to_end(resp, MAX_ERROR_BYTES))
    except (GatewayError, orjson.JSONDecodeError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), dict):
        return None
    return scrub_key(orjson.dumps({"error": obj["error"]}), api_key)


async def read_to_end(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The whole body of `resp`, at most `cap` bytes (more: `AnswerTooLarge`), read to its
    end (`bodies.read_capped`); a `Content-Length` over the cap is refused at once. Client
    errors become the gateway's (timeout: 504, anything else: 502)."""
    length = resp.content_length
    if length is not None and length > cap:
        raise _too_large()
    try:
        return await read_capped(resp.content, cap, _too_large)
    except TimeoutError:
        raise UpstreamTimeout("upstream timed out") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError("upstream connection lost") from exc


def _too_large() -> AnswerTooLarge:
    return AnswerTooLarge("upstream answer too large", code="bad_upstream_response")


def _discard(resp: aiohttp.ClientResponse) -> None:
    if not resp.content.at_eof():
        resp.close()
    resp.release()


def retry_after_seconds(value: str | None) -> float | None:
    """An upstream's Retry-After (delta-seconds or HTTP-date, RFC 9110 10.2.3) in seconds."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # float() also reads "inf", "nan" and 400 digits (as inf): no usable hint, and an
        # infinite one would overflow math.ceil wherever it is turned into a Retry-After.
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def relay_headers(upstream: CIMultiDictProxy[str], status: int) -> dict[str, str]:
    """Upstream response headers worth passing to the client.

    A 429 relayed as sent still carries what every 429 of the gateway does: an integer
    Retry-After of at least 1 (the upstream's, rounded up, when it gave one; an HTTP-date
    becomes seconds), so a client's backoff never spins on `0` or waits on nothing.
    """
    out = {}
    for name in ("openai-processing-ms", "openai-version", "openai-model", "retry-after"):
        value = upstream.get(name)
        if value is not None:
            out[name] = value
    if status == 429:
        hinted = retry_after_seconds(out.pop("retry-after", None))
        out["Retry-After"] = retry_after_value(hinted or 0)
    return out


def scrub_key(data: bytes, api_key: str) -> bytes:
    """An upstream's answer without the upstream's key: some upstreams quote the credential
    they were sent (a 401's message), and what they answer is relayed to our client."""
    return data.replace(api_key.encode(), b"[REDACTED]") if api_key else data
