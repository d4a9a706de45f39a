"""The FastAPI application factory."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request, Response

from api import batches, compat, errors, events, files, fine_tuning, health, inference, models, webhooks
from api.idempotency import idempotency_middleware
from domain.settings import get_settings

log = logging.getLogger(__name__)

# JSON bodies beyond this are refused before parsing; uploads get the file cap plus form overhead.
MAX_JSON_BODY = 8 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    # Each synchronous inference request holds a thread while it waits for its reply; Starlette's default
    # of 40 would queue requests before the inference worker could batch them.
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = max(limiter.total_tokens, get_settings().inference_concurrency + 16)
    yield


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        lifespan=_lifespan,
        title="LLM OS",
        version="0.1.0",
        description="Fine-tune and serve language models: an OpenAI-compatible asynchronous job API.",
    )
    errors.install(app)

    health.register_collectors()
    # Registered first, so it runs inside request_context: replays get a request ID and metrics too.
    app.middleware("http")(idempotency_middleware)

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request_id = request.headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
        length = request.headers.get("content-length")
        is_upload = request.url.path.startswith("/v1/files")
        cap = settings.max_upload_bytes + MULTIPART_OVERHEAD if is_upload else MAX_JSON_BODY
        started = time.perf_counter()
        if length and length.isdigit() and int(length) > cap:
            response: Response = errors.error_response(
                413, f"request body exceeds the {cap} byte limit", "invalid_request_error", None,
                "request_too_large")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        health.REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        health.LATENCY.labels(request.method, path).observe(time.perf_counter() - started)
        response.headers["X-Request-ID"] = request_id
        return response

    for module in (health, files, fine_tuning, models, inference, webhooks, events, compat):
        app.include_router(module.router, responses=errors.ERROR_RESPONSES)
    app.include_router(batches.router, responses=errors.ERROR_RESPONSES)
    return app
