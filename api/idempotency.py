"""``Idempotency-Key`` on every POST, with Stripe's semantics.

The same key and body within 24 h replays the first response (``Idempotent-Replayed: true``); the same key
with another body is 422; a duplicate while the first is still running is 409. A 5xx is not stored, so a
retry after our own failure runs again.

Keys are scoped per API key (stored as a hash of the API key's ID and the client's key): another key of the
same tenant, which may hold other scopes, never receives a response made for this one (a webhook secret,
say); its request runs, and meets the route's own scope check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from sqlalchemy.orm import Session

from api.boundary import transaction
from api.deps import Principal, bearer_token, principal_for
from api.errors import error_response
from db import idempotency

HEADER = "idempotency-key"
MAX_KEY_LENGTH = 255


def _request_hash(method: str, path: str, body: bytes, content_type: str) -> str:
    if content_type.startswith("application/json"):
        # Compared as JSON: key order and whitespace do not make two bodies different.
        with contextlib.suppress(ValueError):
            body = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    elif content_type.startswith("multipart/form-data") and "boundary=" in content_type:
        # Clients draw a fresh random boundary per request: it is framing, not content.
        boundary = content_type.split("boundary=", 1)[1].split(";", 1)[0].strip('"').encode()
        body = body.replace(boundary, b"BOUNDARY")
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).hexdigest()


async def _principal(request: Request) -> Principal | None:
    token = bearer_token(request.headers)
    return None if token is None else await principal_for(token)


def _scoped(principal: Principal, key: str) -> str:
    """The stored key: the client's key within the API key that sent it."""
    return hashlib.sha256(f"{principal.key_id}\x00{key}".encode()).hexdigest()


def _claim(session: Session, *, tenant_id: str, key: str, digest: str, method: str,
           path: str) -> tuple[str, int | None, bytes | None, str | None] | None:
    row = idempotency.claim(session, tenant_id, key, digest, method, path)
    if row is None:
        return None
    return (row.status if row.request_hash == digest else "mismatch", row.response_status,
            row.response_body, row.response_content_type)


async def idempotency_middleware(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    key = request.headers.get(HEADER)
    if request.method != "POST" or key is None:
        return await call_next(request)
    if not key or len(key) > MAX_KEY_LENGTH:
        return error_response(400, f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} characters", "invalid_request_error",
                              "Idempotency-Key", "invalid_idempotency_key")
    principal = await _principal(request)
    if principal is None:
        return await call_next(request)  # the route answers 401 itself
    tenant_id, key = principal.tenant_id, _scoped(principal, key)
    body = await request.body()
    digest = _request_hash(request.method, request.url.path, body, request.headers.get("content-type", ""))
    earlier = await transaction(_claim, tenant_id=tenant_id, key=key, digest=digest, method=request.method,
                                path=request.url.path)
    if earlier is not None:
        state, status, stored, content_type = earlier
        if state == "mismatch":
            return error_response(422, "This Idempotency-Key was used with a different request body",
                                  "invalid_request_error", "Idempotency-Key", "idempotency_key_reused")
        if state == "in_flight":
            return error_response(409, "A request with this Idempotency-Key is still in progress; retry later",
                                  "invalid_request_error", "Idempotency-Key", "idempotency_key_in_use")
        return Response(content=stored or b"", status_code=status or 200, media_type=content_type,
                        headers={"Idempotent-Replayed": "true"})

    try:
        response = await call_next(request)
    except BaseException:
        await transaction(idempotency.release, tenant_id=tenant_id, key=key)
        raise
    chunks = [chunk async for chunk in response.body_iterator]  # type: ignore[attr-defined]
    content = b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks)
    if response.status_code >= 500:
        await transaction(idempotency.release, tenant_id=tenant_id, key=key)
    else:
        await transaction(idempotency.finish, tenant_id=tenant_id, key=key, status=response.status_code,
                          body=content, content_type=response.headers.get("content-type"))
    return Response(content=content, status_code=response.status_code, headers=dict(response.headers),
                    background=response.background)

