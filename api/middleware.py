"""Per-request context as plain ASGI middleware: request IDs, body caps, metrics.

Plain ASGI rather than Starlette's `BaseHTTPMiddleware`, which runs each request's downstream app in its
own task group with memory streams between them: a millisecond of CPU per layer, a large share of an
online inference request that is otherwise a few statements and a queue message.
"""

from __future__ import annotations

import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors, health
from api.idempotency import HEADER, idempotency_middleware

# JSON bodies beyond this are refused before parsing; uploads get the file cap plus form overhead.
MAX_JSON_BODY = 8 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024


class RequestContext:
    """Gives every response an `X-Request-ID`, refuses oversized bodies (413), and counts and times requests."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes

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

        async def send_with_context(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            if length and length.isdigit() and int(length) > cap:
                response = errors.error_response(413, f"request body exceeds the {cap} byte limit",
                                                 "invalid_request_error", None, "request_too_large")
                await response(scope, receive, send_with_context)
            else:
                await self.app(scope, receive, send_with_context)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            health.REQUESTS.labels(scope["method"], path, str(status)).inc()
            health.LATENCY.labels(scope["method"], path).observe(time.perf_counter() - started)


class Idempotency:
    """`Idempotency-Key` handling (api/idempotency.py) for the POSTs that carry one; others pass straight by."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Keyed requests buffer and store their response; that path keeps the simpler request/response form.
        self.keyed = BaseHTTPMiddleware(app, dispatch=idempotency_middleware)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and HEADER.encode() in dict(scope["headers"]):
            await self.keyed(scope, receive, send)
        else:
            await self.app(scope, receive, send)
