"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from api import batches, compat, errors, events, files, fine_tuning, health, inference, models, webhooks
from api.middleware import Idempotency, RequestContext
from domain.settings import get_settings

log = logging.getLogger(__name__)


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
    # Added first, so it runs inside RequestContext: replays get a request ID and metrics too.
    app.add_middleware(Idempotency)
    app.add_middleware(RequestContext, max_upload_bytes=settings.max_upload_bytes)

    for module in (health, files, fine_tuning, models, inference, webhooks, events, compat):
        app.include_router(module.router, responses=errors.ERROR_RESPONSES)
    app.include_router(batches.router, responses=errors.ERROR_RESPONSES)
    return app
