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
import tempfile
from typing import IO

from fastapi import Response
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.boundary import transaction
from api.deps import Principal, bearer_token, principal_for
from api.errors import error_response
from db import idempotency

HEADER = "idempotency-key"
MAX_KEY_LENGTH = 255


# Of a keyed request's body, this much is held in memory; the rest waits on disk until the route reads it.
SPOOL_IN_MEMORY = 1024 * 1024
REPLAY_CHUNK = 64 * 1024


class BodyDigest:
    """The request's fingerprint, computed as the body streams by, never from a second copy of it.

    JSON is compared as JSON (key order and whitespace do not make two bodies different), so a JSON body
    (at most 8 MiB) is kept to be parsed once whole. A multipart body has its boundary replaced as it
    passes: clients draw a fresh random boundary per request, which is framing, not content. Anything else
    is hashed as it comes.
    """

    def __init__(self, method: str, path: str, content_type: str) -> None:
        self._hash = hashlib.sha256(method.encode() + b" " + path.encode() + b"\n")
        self._json: bytearray | None = bytearray() if content_type.startswith("application/json") else None
        self._boundary = b""
        if content_type.startswith("multipart/form-data") and "boundary=" in content_type:
            self._boundary = content_type.split("boundary=", 1)[1].split(";", 1)[0].strip('"').encode()
        self._carry = b""

    def update(self, chunk: bytes) -> None:
        if self._json is not None:
            self._json += chunk
        elif self._boundary:
            self._replace(chunk)
        else:
            self._hash.update(chunk)

    def _replace(self, chunk: bytes) -> None:
        data, boundary, position = self._carry + chunk, self._boundary, 0
        while (found := data.find(boundary, position)) != -1:
            self._hash.update(data[position:found])
            self._hash.update(b"BOUNDARY")
            position = found + len(boundary)
        # Any occurrence starting before `keep` ends within `data` and was found; the tail may begin one.
        keep = max(position, len(data) - (len(boundary) - 1))
        self._hash.update(data[position:keep])
        self._carry = data[keep:]

    def hexdigest(self) -> str:
        if self._json is not None:
            body = bytes(self._json)
            with contextlib.suppress(ValueError):
                body = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
            self._hash.update(body)
            self._json = None
        elif self._carry:
            self._hash.update(self._carry)
            self._carry = b""
        return self._hash.hexdigest()


async def _principal(headers: Headers) -> Principal | None:
    token = bearer_token(headers)
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


async def keyed_request(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """A POST carrying `Idempotency-Key`: replay, refuse, or run it once and keep its answer.

    The body is read once, into the fingerprint and a spool (in memory up to 1 MiB, then on disk), and
    handed on to the route from there, so an upload is never held in memory whole, let alone twice.
    """
    headers = Headers(scope=scope)
    key = headers.get(HEADER) or ""
    if not key or len(key) > MAX_KEY_LENGTH:
        refusal = error_response(400, f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} characters",
                                 "invalid_request_error", "Idempotency-Key", "invalid_idempotency_key")
        await refusal(scope, receive, send)
        return
    principal = await _principal(headers)
    if principal is None:
        await app(scope, receive, send)  # the route answers 401 itself
        return
    tenant_id, key = principal.tenant_id, _scoped(principal, key)
    path = scope["path"]
    digest = BodyDigest("POST", path, headers.get("content-type", ""))
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its whole body: nothing ran, nothing to keep
            chunk = message.get("body", b"")
            digest.update(chunk)
            spool.write(chunk)
            more = message.get("more_body", False)
        earlier = await transaction(_claim, tenant_id=tenant_id, key=key, digest=digest.hexdigest(), method="POST",
                                    path=path)
        if earlier is not None:
            await _answer_earlier(earlier, scope, receive, send)
            return
        spool.seek(0)
        await _run_once(app, scope, _replay(spool, receive), send, tenant_id=tenant_id, key=key)


async def _answer_earlier(earlier: tuple[str, int | None, bytes | None, str | None], scope: Scope,
                          receive: Receive, send: Send) -> None:
    state, status, stored, content_type = earlier
    response: Response
    if state == "mismatch":
        response = error_response(422, "This Idempotency-Key was used with a different request body",
                                  "invalid_request_error", "Idempotency-Key", "idempotency_key_reused")
    elif state == "in_flight":
        response = error_response(409, "A request with this Idempotency-Key is still in progress; retry later",
                                  "invalid_request_error", "Idempotency-Key", "idempotency_key_in_use")
    else:
        response = Response(content=stored or b"", status_code=status or 200, media_type=content_type,
                            headers={"Idempotent-Replayed": "true"})
    await response(scope, receive, send)


def _replay(spool: IO[bytes], receive: Receive) -> Receive:
    """The body again, from the spool, in chunks; then whatever the client sends next (a disconnect)."""
    done = False

    async def replay() -> Message:
        nonlocal done
        if done:
            return await receive()
        chunk = spool.read(REPLAY_CHUNK)
        done = len(chunk) < REPLAY_CHUNK
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return replay


async def _run_once(app: ASGIApp, scope: Scope, receive: Receive, send: Send, *, tenant_id: str, key: str) -> None:
    """Run the route and store its answer before the client gets it: a client that retries the moment it
    has the answer must find it stored (a replay), not still in flight (409). POST answers are small."""
    status = 500
    content_type: str | None = None
    messages: list[Message] = []

    async def keep(message: Message) -> None:
        nonlocal status, content_type
        if message["type"] == "http.response.start":
            status = message["status"]
            content_type = Headers(raw=message["headers"]).get("content-type")
        messages.append(message)

    try:
        await app(scope, receive, keep)
    except BaseException:
        await transaction(idempotency.release, tenant_id=tenant_id, key=key)
        raise
    if status >= 500:
        # Our failure, not the request's: a retry runs again.
        await transaction(idempotency.release, tenant_id=tenant_id, key=key)
    else:
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        await transaction(idempotency.finish, tenant_id=tenant_id, key=key, status=status, body=body,
                          content_type=content_type)
    for message in messages:
        await send(message)
