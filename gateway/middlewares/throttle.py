"""Per-client throttle, after auth: `rpm` (GCRA), `tpm` (charged from usage), `max_concurrent`.

Order of checks: rpm counts the request; tpm refuses while the client has spent more than a
minute's tokens (charged after each response, when the usage is known); a concurrency slot
is taken last, so a refused request never holds one. The slot is a `state.Slot` at
`request[SLOT]`, released in `finally` on every exit (answer, error, 429 further down,
disconnect, timeout) unless the handler `detach()`ed it to a generation that outlives the
request, which then calls `release()` itself.

Every authenticated response carries x-ratelimit-*-requests (and -tokens when tpm is set);
every 429 an integer Retry-After >= 1. `exchange.reason` records why a request was refused.
"""

from __future__ import annotations

import math

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..errors import RateLimited
from ..identity import Identity
from ..limits import LIMITER, LimiterBackend
from ..limits.gcra import Decision, Rate, tokens_per_minute
from ..policy import PolicyHolder
from ..state import EXCHANGE, IDENTITY, SLOT, UNCOUNTED
from .headers import add_response_headers

log = structlog.get_logger("gateway.throttle")


class LeaseSlot:
    """A held concurrency lease (implements `state.Slot`); release is idempotent."""

    __slots__ = ("_key", "_lease", "_limiter", "detached", "released")

    def __init__(self, limiter: LimiterBackend, key: str, lease: str) -> None:
        self._limiter = limiter
        self._key = key
        self._lease = lease
        self.detached = False
        self.released = False

    def detach(self) -> None:
        self.detached = True

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            await self._limiter.slot_release(self._key, self._lease)
        except Exception:  # the lease's TTL frees it; the answer must not fail for this
            log.warning("slot_release_failed", client=self._key, exc_info=True)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


# The header names per kind, built once rather than formatted for every request.
_NAMES = {
    kind: (
        f"x-ratelimit-limit-{kind}",
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-reset-{kind}",
    )
    for kind in ("requests", "tokens")
}


def _headers(kind: str, d: Decision) -> dict[str, str]:
    limit, remaining, reset = _NAMES[kind]
    return {limit: str(d.limit), remaining: str(d.remaining), reset: _duration(d.reset_after)}


def tpm_rate(identity: Identity) -> Rate | None:
    return tokens_per_minute(identity.tpm) if identity.tpm else None


async def charge_tokens(app: web.Application, identity: Identity, tokens: int) -> None:
    """Charge `tokens` to a client's tpm budget (for work finished after its request did:
    a detached generation calls this when its usage arrives)."""
    rate = tpm_rate(identity)
    if rate is not None and tokens > 0:
        await app[LIMITER].charge(f"tpm:{identity.client}", rate, tokens)


def make_client_throttle_middleware(holder: PolicyHolder) -> Middleware:
    @web.middleware
    async def throttle(request: web.Request, handler: Handler) -> web.StreamResponse:
        identity = request.get(IDENTITY)
        if identity is None:  # a public route
            return await handler(request)
        limiter = request.app[LIMITER]
        ex = request[EXCHANGE]
        client = identity.client
        if identity.rpm:
            d = await limiter.hit(f"rpm:{client}", Rate(identity.rpm, 60.0, identity.burst))
            add_response_headers(request, _headers("requests", d))
            if not d.allowed:
                ex.reason = "rpm"
                raise RateLimited("Rate limit reached for requests", retry_after=d.retry_after)
        tpm = tpm_rate(identity)
        if tpm is not None:
            d = await limiter.debt(f"tpm:{client}", tpm)
            add_response_headers(request, _headers("tokens", d))
            if not d.allowed:
                ex.reason = "tpm"
                raise RateLimited("Rate limit reached for tokens", retry_after=d.retry_after)
        slot = None
        if identity.max_concurrent and not (request.match_info.route.name or "").startswith(
            UNCOUNTED
        ):
            key = f"conc:{client}"
            lease = await limiter.slot_acquire(
                key, identity.max_concurrent, holder.current.lease_ttl
            )
            if lease is None:
                ex.reason = "concurrency"
                raise RateLimited(
                    f"Too many concurrent requests (max {identity.max_concurrent})",
                    retry_after=1,
                )
            slot = request[SLOT] = LeaseSlot(limiter, key, lease)
        try:
            return await handler(request)
        finally:
            if slot is not None and not slot.detached:
                await slot.release()
            if tpm is not None and ex.usage is not None and ex.usage.total_tokens:
                await limiter.charge(f"tpm:{client}", tpm, ex.usage.total_tokens)

    return throttle
