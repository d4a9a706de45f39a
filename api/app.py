"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import (
    batches,
    compat,
    dashboard,
    errors,
    events,
    files,
    fine_tuning,
    health,
    inference,
    limits,
    models,
    webhooks,
)
from api.middleware import Idempotency, RequestContext
from core.settings import get_settings
from db import aio
from infra import cache, ratelimit, replies

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
    await ratelimit.close()
    await cache.close()


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        lifespan=_lifespan,
        title="LLM OS",
        version="0.1.0",
        description="Fine-tune and serve language models: an OpenAI-compatible asynchronous job API.",
        # Our metrics are Prometheus' (/metrics); FastAPI's native OpenTelemetry hooks would look up their
        # providers on every request (a twentieth of a GET's CPU in a profile) to find them unconfigured.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # Served by api/dashboard.py with their assets from our origin: FastAPI's own pages load from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    errors.install(app)

    health.register_collectors()
    # Added first, so it runs inside RequestContext: replays get a request ID and metrics too.
    app.add_middleware(Idempotency)
    app.add_middleware(RequestContext, max_upload_bytes=settings.max_upload_bytes, hsts=settings.tls_enabled,
                       operator_token=settings.metrics_token)

    # Routes are matched in order, one regex each: the ones polled and called most often come first.
    for module in (fine_tuning, inference, batches, files, models, events, webhooks, limits, compat, health):
        app.include_router(module.router, responses=errors.ERROR_RESPONSES)
    app.include_router(dashboard.router)
    dashboard.install_docs(app)
    return app
