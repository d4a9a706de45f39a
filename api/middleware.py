"""Per-request context as plain ASGI middleware: request IDs, body caps, metrics.

Plain ASGI rather than Starlette's `BaseHTTPMiddleware`, which runs each request's downstream app in its
own task group with memory streams between them: a millisecond of CPU per layer, a large share of an
online inference request that is otherwise a few statements and a queue message.
"""

from __future__ import annotations

import hmac
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors, health
from api.deps import RATE_HEADERS, bearer_token, key_refused, principal_for
from api.idempotency import HEADER, keyed_request

# JSON bodies beyond this are refused before parsing; uploads get the file cap plus form overhead.
MAX_JSON_BODY = 8 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024


# Routes anyone may call; every other request must carry a valid key, checked before its body is read.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
                          "/openapi.json"})


# Operators' pages, which `LLMOS_METRICS_TOKEN` closes to everyone without it.
OPERATOR_PATHS = frozenset({"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers


class RequestContext:
    """Gives every response an `X-Request-ID`, refuses unauthenticated bodies (401) and oversized ones (413)
    before they are read or parsed, and counts and times requests.

    The body cap is counted on the bytes actually received, so a chunked body without `Content-Length` meets
    it too; a declared length over the cap is refused without reading a byte.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int, hsts: bool = False,
                 operator_token: str | None = None) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.operator_token = operator_token
        # Served over TLS: browsers are told to use nothing else for two years.
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
        length = headers.get("content-length")
        is_upload = scope["path"].startswith("/v1/files")
        cap = self.max_upload_bytes + MULTIPART_OVERHEAD if is_upload else MAX_JSON_BODY
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaping the app is a 500 to the client
        response_started = False
        received = 0
        has_body = _has_body(headers)
        body_done = not has_body

        async def send_with_context(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                if not body_done:
                    # Answered before the whole body came (401, 413): the connection is closed after the
                    # answer, or the server would go on receiving, and parsing, whatever the client sends.
                    headers["Connection"] = "close"
                if self.hsts:
                    headers["Strict-Transport-Security"] = "max-age=63072000; includeSubDomains"
                # Set by the rate limiter once the key is known (api/deps.py), on errors too.
                for name, value in scope.get(RATE_HEADERS, {}).items():
                    headers[name] = value
            await send(message)

        async def counted_receive() -> Message:
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise BodyTooLarge(cap)
                body_done = not message.get("more_body", False)
            return message

        try:
            if length and length.isdigit() and int(length) > cap:
                refusal: Response | None = errors.render(_too_large(cap))
            elif scope["path"] not in PUBLIC_PATHS and has_body:
                refusal = await _refuse_without_key(headers)
            elif self.operator_token and scope["path"] in OPERATOR_PATHS and not _token_matches(
                    headers, self.operator_token):
                refusal = errors.render(errors.APIError(
                    401, "This page needs 'Authorization: Bearer <LLMOS_METRICS_TOKEN>'.",
                    type_="authentication_error", code="missing_operator_token"))
            else:
                refusal = None
            if refusal is not None:
                await refusal(scope, receive, send_with_context)
            else:
                await self.app(scope, counted_receive, send_with_context)
        except BodyTooLarge:
            # Raised while reading the body outside a route (the idempotency layer buffers keyed requests).
            if response_started:
                raise
            await errors.render(_too_large(cap))(scope, receive, send_with_context)
        finally:
            # Labels never carry raw client input: an unknown method would be a new series per request.
            method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"
            path = getattr(scope.get("route"), "path", "unmatched")
            health.REQUESTS.labels(method, path, str(status)).inc()
            health.LATENCY.labels(method, path).observe(time.perf_counter() - started)


def _token_matches(headers: Headers, expected: str) -> bool:
    token = bearer_token(headers)
    return token is not None and hmac.compare_digest(token.encode(), expected.encode())


class BodyTooLarge(HTTPException):
    """Raised from `receive` at the cap; an HTTPException, so FastAPI's body parsing lets it through as is
    (and the HTTPException handler renders it, `request_too_large`)."""

    def __init__(self, cap: int) -> None:
        super().__init__(413, _too_large(cap).message)


def _too_large(cap: int) -> errors.APIError:
    return errors.APIError(413, f"request body exceeds the {cap} byte limit", code="request_too_large")


async def _refuse_without_key(headers: Headers) -> Response | None:
    """401 for a request with a body and no valid key, so nothing of it is read; None lets it through.

    Where the key cannot be checked now (the database is down), the request goes on to its route, which
    answers for itself (503).
    """
    token = bearer_token(headers)
    try:
        valid = token is not None and await principal_for(token) is not None
    except Exception:
        return None
    return None if valid else errors.render(key_refused(token))


class Idempotency:
    """`Idempotency-Key` handling (api/idempotency.py) for the POSTs that carry one; others pass straight by."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and HEADER.encode() in dict(scope["headers"]):
            await keyed_request(self.app, scope, receive, send)
        else:
            await self.app(scope, receive, send)
