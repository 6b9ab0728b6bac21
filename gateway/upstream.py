"""The upstream side: which upstream serves a model, and opening a response from it.

This is the one boundary where aiohttp's client errors become the gateway's error tree.
`UpstreamPool.open()` returns a `ClientResponse` whose headers have arrived, after the
retries the config allows; everything before that point can still be retried, nothing
after it is (the caller starts writing to the client once it holds the response).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import Config, UpstreamConfig
from .errors import GatewayError, NotFound, UpstreamError, UpstreamTimeout
from .exchange import Exchange

# Upstream answers worth another try (elsewhere or later); 429 does not open a breaker.
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})

# Client headers passed upstream by name; any other `x-*` header passes too, unless it could
# carry a credential or is ours to set. Everything else (hop-by-hop headers, Host, Cookie,
# Authorization) stays behind.
_PASS = frozenset({"accept", "user-agent", "openai-beta"})
_HOLD_X = ("x-api-key", "x-forwarded-", "x-real-ip", "x-request-id")
_HOLD_WORDS = ("key", "token", "secret", "auth", "cookie", "session", "password")


def forward_headers(incoming: Mapping[str, str]) -> CIMultiDict[str]:
    """The client's headers that may go upstream (credentials and hop-by-hop never do)."""
    out: CIMultiDict[str] = CIMultiDict()
    # Headers the client named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    hop = {t.strip().lower() for t in incoming.get("Connection", "").split(",")}
    for name, value in incoming.items():
        low = name.lower()
        if low in hop:
            continue
        if low in _PASS or (
            low.startswith("x-")
            and not low.startswith(_HOLD_X)
            and not any(w in low for w in _HOLD_WORDS)
        ):
            out.add(name, value)
    return out


@dataclass(slots=True)
class Upstream:
    """One configured upstream with everything derived from its config built once."""

    cfg: UpstreamConfig
    base: URL
    auth: str | None
    timeout: aiohttp.ClientTimeout

    @classmethod
    def from_config(cls, cfg: UpstreamConfig) -> Upstream:
        return cls(
            cfg=cfg,
            base=cfg.base_url,
            auth=f"Bearer {cfg.api_key}" if cfg.api_key else None,
            # No 300 s default total: streams may be long. sock_read is the idle limit between
            # two reads (it also bounds the wait for headers; first_byte_timeout does too).
            timeout=aiohttp.ClientTimeout(
                total=cfg.total_timeout,
                sock_connect=cfg.connect_timeout,
                sock_read=cfg.idle_timeout,
            ),
        )

    @property
    def name(self) -> str:
        return self.cfg.name

    def serves(self, model: str | None) -> bool:
        return model is None or any(fnmatchcase(model, p) for p in self.cfg.models)


class UpstreamPool:
    """Chooses upstreams for a model and opens responses from them, with retries."""

    def __init__(self, cfg: Config, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.upstreams = [Upstream.from_config(u) for u in cfg.upstreams]
        self.retry = cfg.retry

    def candidates(self, model: str | None) -> list[Upstream]:
        """Upstreams serving `model`: by priority, then a weighted shuffle among equals."""
        found = [u for u in self.upstreams if u.serves(model)]
        # Weighted random order (Efraimidis-Spirakis): key = U^(1/w), larger first.
        keyed = [(u.cfg.priority, -(random.random() ** (1.0 / u.cfg.weight)), i, u) for i, u in enumerate(found)]
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
        """Send the request and return the first response worth relaying."""
        order = self.candidates(ex.model)
        if not order:
            raise NotFound(f"The model `{ex.model}` does not exist", code="model_not_found")
        headers["traceparent"] = ex.traceparent
        headers["X-Request-ID"] = ex.request_id
        if body is not None:
            headers["Content-Type"] = "application/json"
        last: GatewayError | None = None
        attempts = self.retry.attempts
        for attempt in range(attempts):
            up = order[attempt % len(order)]
            ex.attempts = attempt + 1
            ex.upstream = up.name
            final = attempt == attempts - 1
            try:
                resp = await self._send(up, method, path, body, headers)
            except GatewayError as exc:
                last = exc
            else:
                if resp.status not in RETRYABLE_STATUS or final:
                    return up, resp
                resp.release()
                last = UpstreamError(f"upstream answered {resp.status}")
            if not final:
                await asyncio.sleep(self._backoff(attempt))
        assert last is not None
        raise last

    def _backoff(self, attempt: int) -> float:
        # Exponential backoff with full jitter.
        cap = min(self.retry.backoff_max, self.retry.backoff_initial * (2**attempt))
        return random.uniform(0, cap)

    async def _send(
        self,
        up: Upstream,
        method: str,
        path: str,
        body: bytes | None,
        headers: CIMultiDict[str],
    ) -> aiohttp.ClientResponse:
        if up.auth is not None:
            headers["Authorization"] = up.auth
        else:
            headers.popall("Authorization", None)
        url = up.base.with_path(up.base.path + path, encoded=True)
        try:
            async with asyncio.timeout(up.cfg.first_byte_timeout):
                return await self.session.request(
                    method, url, data=body, headers=headers, timeout=up.timeout
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {up.name} timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream {up.name} is unreachable") from exc


def relay_headers(upstream: CIMultiDictProxy[str]) -> dict[str, str]:
    """Upstream response headers worth passing to the client."""
    out = {}
    for name in ("openai-processing-ms", "openai-version", "openai-model", "retry-after"):
        value = upstream.get(name)
        if value is not None:
            out[name] = value
    return out
