"""Request dependencies: the authenticated principal and its scopes.

Keys are looked up by hash and remembered per process for `auth_cache_seconds` (5 s by default): a
request then costs no database round trip for its key, and a revoked key stops working within that time
(an expired one at once: its expiry is checked on every request). Each lookup also records the key's use.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from fastapi import Depends, Request

from api.boundary import read_rows
from api.errors import APIError
from core.settings import get_settings
from db import tenants
from domain.quotas import effective
from infra import ratelimit

SCOPES = ("files", "fine_tuning", "batches", "inference", "webhooks", "admin")
# Unknown keys are remembered too (a client retrying a bad key must not cost a query each time); past this
# many entries the cache starts over, so a flood of random keys cannot grow it without bound.
KEY_CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    tenant_name: str
    key_id: str
    scopes: frozenset[str]
    # The tenant's rate limits in force; None is unlimited.
    rpm: int | None = None
    tpm: int | None = None
    # Unix time the key stops working (None: never); checked on every request, cached or not.
    expires_at: float | None = None


_keys: dict[str, tuple[float, Principal | None]] = {}


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def principal_for(token: str) -> Principal | None:
    """The active key's principal, from the cache while fresh, else from the database."""
    digest = tenants.hash_key(token)
    now = time.monotonic()
    cached = _keys.get(digest)
    if cached is not None and cached[0] > now:
        principal = cached[1]
        if principal is not None and principal.expires_at is not None and principal.expires_at <= time.time():
            return None
        return principal
    found = await read_rows(tenants.find_active_key, key_hash=digest)
    principal = None if found is None else Principal(
        tenant_id=found.tenant_id, tenant_name=found.tenant_name, key_id=found.key_id, scopes=frozenset(found.scopes),
        rpm=effective(found.rpm, "rpm"), tpm=effective(found.tpm, "tpm"),
        expires_at=None if found.expires_at is None else found.expires_at.timestamp())
    if len(_keys) >= KEY_CACHE_ENTRIES:
        _keys.clear()
    _keys[digest] = (now + get_settings().auth_cache_seconds, principal)
    return principal


def key_refused(token: str | None) -> APIError:
    """The 401 for a request without a key (``token`` None) or with one that is not active."""
    if token is None:
        return APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                        type_="authentication_error", code="missing_api_key")
    return APIError(401, "Invalid, expired or revoked API key.", type_="authentication_error",
                    code="invalid_api_key")


# Where a request's `x-ratelimit-*` headers wait in its ASGI scope for the response (RequestContext sends them).
RATE_HEADERS = "llmos.rate_headers"


def rate_limited(decision: ratelimit.Decision, unit: str, what: str) -> APIError:
    """The 429 for a refused request: OpenAI's type and code, and when to try again."""
    if decision.retry_after is None:
        message = f"This request alone needs more {unit} than the limit of {decision.limit} {what}."
        retry = 60
    else:
        wait = ratelimit.duration(decision.retry_after)
        message = f"Rate limit reached: {decision.limit} {what}. Try again in {wait}."
        retry = max(1, math.ceil(decision.retry_after))
    return APIError(429, message, type_="rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry), **decision.headers(unit)})


async def charge(request: Request, tenant_id: str, kind: str, limit: int | None, cost: int) -> None:
    """Count ``cost`` against a limit, put its headers on the answer, and refuse (429) when it does not fit."""
    if limit is None:
        return
    decision = await ratelimit.hit(tenant_id, kind, limit, cost)
    if decision is None:
        return
    unit, what = ("requests", "requests per minute") if kind == "rpm" else ("tokens", "tokens per minute")
    request.scope.setdefault(RATE_HEADERS, {}).update(decision.headers(unit))
    if not decision.allowed:
        raise rate_limited(decision, unit, what)


async def authenticate(request: Request) -> Principal:
    """The request's key, checked, and one request counted against its tenant's `rpm`."""
    token = bearer_token(request.headers)
    principal = None if token is None else await principal_for(token)
    if principal is None:
        raise key_refused(token)
    await charge(request, principal.tenant_id, "rpm", principal.rpm, 1)
    return principal


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that authenticates and demands ``scope`` (``admin`` holds every scope)."""

    async def dependency(principal: Principal = Depends(authenticate)) -> Principal:
        if scope not in principal.scopes and "admin" not in principal.scopes:
            raise APIError(403, f"This key lacks the '{scope}' scope.", type_="permission_error",
                           code="missing_scope")
        return principal

    return dependency
