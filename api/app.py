"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import batches, compat, errors, events, files, fine_tuning, health, inference, models, webhooks
from api.middleware import Idempotency, RequestContext
from core.settings import get_settings
from db import aio
from domain import replies

log = logging.getLogger(__name__)


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield
    # Connections belong to this process's event loop; close them with it.
    await aio.dispose()
    client = replies.async_client()
    if client is not None:
        await client.aclose()
    replies.async_client.cache_clear()


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
