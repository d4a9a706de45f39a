"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import anyio
from alembic.config import Config
from alembic.script import ScriptDirectory
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from api import objects
from api.boundary import read_rows
from api.errors import JSONBody
from db import jobs as jobs_repo
from db.session import current_revision, session_factory
from domain import dispatch
from infra import broker, replies

router = APIRouter(tags=["operations"])
ROOT = Path(__file__).resolve().parent.parent

REQUESTS = Counter("llmos_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("llmos_http_request_seconds", "HTTP request latency", ["method", "route"])


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "db" / "migrations"))
    return ScriptDirectory.from_config(config).get_current_head()


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _broker_reachable() -> None:
    with broker.producer().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


@router.get("/readyz", summary="Database, broker and migrations are ready",
            responses={200: {"model": objects.Readiness}, 503: {"model": objects.Readiness,
                                                                 "description": "A part is not ready; see checks"}})
async def readyz() -> JSONBody:
    checks: dict[str, Any] = {}
    try:
        current = await read_rows(current_revision)
        checks["database"] = "ok"
        head = head_revision()
        checks["migrations"] = "ok" if current == head else f"at {current}, head is {head}"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
        checks["migrations"] = "unknown"
    try:
        await anyio.to_thread.run_sync(_broker_reachable)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONBody({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})


class StateCollector(Collector):
    """Gauges read at scrape time from the truth: jobs by status and queue depths."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("llmos_jobs", "Fine-tuning jobs by status", labels=["status"])
        try:
            with session_factory()() as session:
                counts = jobs_repo.count_by_status(session)
            for status, count in counts.items():
                jobs.add_metric([status], count)
        except Exception:
            pass  # A scrape during an outage reports what it can; readyz tells the rest.
        yield jobs
        depth = GaugeMetricFamily("llmos_queue_depth", "Messages waiting in each queue", labels=["queue"])
        try:
            conn = replies.client()
            if conn is not None:
                for queue in (dispatch.QUEUE_GPU, dispatch.QUEUE_INFERENCE, dispatch.QUEUE_CPU):
                    depth.add_metric([queue], int(conn.llen(queue)))
        except Exception:
            pass
        yield depth


_STATE = StateCollector()
_collector_registered = False


def _multiprocess() -> bool:
    # Set by `llmos api` when it runs several processes: their counters then live in files there.
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def register_collectors() -> None:
    global _collector_registered
    if not _collector_registered and not _multiprocess():
        REGISTRY.register(_STATE)
        _collector_registered = True


def _scrape_registry() -> CollectorRegistry:
    """Every API process's counters when there are several (whichever process answers), else this one's."""
    if not _multiprocess():
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(_STATE)
    return registry


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(_scrape_registry()), media_type=CONTENT_TYPE_LATEST)
