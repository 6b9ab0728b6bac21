"""Auth: who is calling. API keys (by SHA-256) and/or JWTs, per `[auth].mode`.

Credentials come as `Authorization: Bearer <key or JWT>` or `x-api-key: <key>`. A key is
hashed and looked up by its SHA-256 (the config holds only hashes), and the stored digest is
still compared with `hmac.compare_digest`. In "keys+jwt" mode a token with two dots is a JWT.
A JWT's client is its `client_claim`; a subject equal to a configured client gets that
client's limits and models, any other subject the `[auth.jwt]` defaults.

Public routes (name starting with `state.PUBLIC`) and requests for no route (404/405 are
answered as such, not 401) pass without credentials. Sets `request[IDENTITY]` and the
exchange's `client`; every 401 carries `WWW-Authenticate: Bearer` (errors.Unauthorized).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Awaitable

import jwt
import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from ..errors import Unauthorized
from ..identity import ANONYMOUS, Identity
from ..policy import JWTPolicy, Policy, PolicyHolder
from ..state import EXCHANGE, IDENTITY, PUBLIC


def _credential(request: web.Request) -> str | None:
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Authorization must be 'Bearer <key>'")
        return token.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def _by_key(policy: Policy, token: str) -> Identity:
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
    stored, ident = policy.by_hash.get(digest, ("", ANONYMOUS))
    # The dict found the entry by its hash; the stored hash is still compared in constant
    # time, so accepting a key never rests on a short-circuiting comparison.
    if not hmac.compare_digest(stored, digest):
        raise Unauthorized("Invalid API key")
    return ident


_JWT_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidSignatureError, "bad signature"),
)


def _by_jwt(policy: Policy, rules: JWTPolicy, token: str) -> Identity:
    # A JWT is base64url and dots. A header byte that is not UTF-8 arrives as a surrogate,
    # on which PyJWT's encode() raises UnicodeEncodeError (no PyJWTError): a 500, otherwise.
    if not token.isascii():
        raise Unauthorized("Invalid token: malformed token", code="invalid_token")
    try:
        alg = jwt.get_unverified_header(token).get("alg")
        key = rules.keys.get(alg) if isinstance(alg, str) else None
        if not isinstance(alg, str) or key is None:
            raise Unauthorized("Invalid token: algorithm not accepted", code="invalid_token")
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=rules.audience,
            issuer=rules.issuer,
            options={"verify_aud": rules.audience is not None, "require": list(rules.require)},
        )
    except jwt.PyJWTError as exc:
        why = next((m for cls, m in _JWT_ERRORS if isinstance(exc, cls)), "malformed token")
        if isinstance(exc, jwt.MissingRequiredClaimError):
            why = f"missing {exc.claim!r} claim"
        raise Unauthorized(f"Invalid token: {why}", code="invalid_token") from None
    client = claims.get(rules.client_claim)
    if not isinstance(client, str) or not client:
        raise Unauthorized(f"Invalid token: no {rules.client_claim!r} claim", code="invalid_token")
    known = policy.by_client.get(client)
    return known if known is not None else dataclasses.replace(rules.defaults, client=client)


def authenticate(policy: Policy, token: str) -> Identity:
    """The identity a presented credential stands for; raises Unauthorized."""
    if policy.jwt is not None and (policy.mode == "jwt" or token.count(".") == 2):
        return _by_jwt(policy, policy.jwt, token)
    if policy.mode == "jwt":
        raise Unauthorized("Invalid token", code="invalid_token")
    return _by_key(policy, token)


def make_auth_middleware(holder: PolicyHolder) -> Middleware:
    # Not a coroutine: it only looks at the request, so it hands back the handler's own
    # awaitable and no frame of its stays in the chain for a stream's life.
    @web.middleware
    def auth(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        info = request.match_info
        name = info.route.name
        if (name is not None and name.startswith(PUBLIC)) or info.http_exception is not None:
            return handler(request)
        policy = holder.current
        if policy.mode == "none":
            identity = ANONYMOUS
        else:
            token = _credential(request)
            if token is None:
                raise Unauthorized(
                    "Missing credentials: send 'Authorization: Bearer <key>' or 'x-api-key'",
                    code="missing_api_key",
                )
            identity = authenticate(policy, token)
        request[IDENTITY] = identity
        request[EXCHANGE].client = identity.client
        structlog.contextvars.bind_contextvars(client=identity.client)
        return handler(request)

    return auth
