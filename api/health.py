"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import anyio
from alembic.config import Config
from alembic.script import ScriptDirectory
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from api import objects
from api.boundary import read_rows
from api.errors import JSONBody
from core.clock import utcnow
from db import jobs as jobs_repo
from db import webhooks as webhooks_repo
from db.session import current_revision, session_factory
from domain import batching, dispatch
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


# How far back the webhook outcome gauge looks: long enough for a steady rate, short enough to alert on.
WEBHOOK_WINDOW = timedelta(minutes=5)


class StateCollector(Collector):
    """Families read at scrape time from the truth, so they hold for any number of workers and hosts.

    Workers export nothing themselves: what they do lands in Postgres (jobs, heartbeats, progress, webhook
    attempts) or, for inference batch sizes, in a Redis hash, and every API process reads the same. One bounded
    query per family; a family whose source is down is still declared, without samples, and readyz says why.
    """

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("llmos_jobs", "Fine-tuning jobs by status", labels=["status"])
        heartbeat = GaugeMetricFamily(
            "llmos_worker_heartbeat_age_seconds",
            "Seconds since the newest heartbeat of a running job, by the queue of the workers that run it "
            "(no sample while none runs)", labels=["queue"])
        samples = GaugeMetricFamily("llmos_training_samples_per_second",
                                    "Training throughput summed over running jobs, as their last progress reported")
        deliveries = GaugeMetricFamily(
            "llmos_webhook_deliveries",
            "Webhook deliveries waiting for an attempt (pending) or given up (failed)", labels=["status"])
        attempts = GaugeMetricFamily(
            "llmos_webhook_attempts_last_5m",
            "Webhook delivery attempts in the last 5 minutes by outcome (succeeded: a 2xx answer)",
            labels=["outcome"])
        try:
            with session_factory()() as session:
                # One snapshot for every family: read statement by statement, a delivery could be counted
                # pending by one query and its successful attempt by the next (both commit together).
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                for status, count in jobs_repo.count_by_status(session).items():
                    jobs.add_metric([status], count)
                newest, throughput = jobs_repo.training_liveness(session)
                if newest is not None:
                    heartbeat.add_metric([dispatch.QUEUE_GPU], max(0.0, (utcnow() - newest).total_seconds()))
                samples.add_metric([], throughput)
                waiting = webhooks_repo.open_and_failed_deliveries(session)
                for status in ("pending", "failed"):
                    deliveries.add_metric([status], waiting.get(status, 0))
                outcomes = webhooks_repo.recent_attempt_outcomes(session, utcnow() - WEBHOOK_WINDOW)
                for outcome in ("succeeded", "failed"):
                    attempts.add_metric([outcome], outcomes.get(outcome, 0))
        except Exception:
            pass  # A scrape during an outage reports what it can; readyz tells the rest.
        yield from (jobs, heartbeat, samples, deliveries, attempts)
        depth = GaugeMetricFamily("llmos_queue_depth", "Messages waiting in each queue", labels=["queue"])
        batch_sizes = HistogramMetricFamily("llmos_inference_batch_size",
                                            "Inputs per forward pass of the inference workers' dynamic batches")
        try:
            conn = replies.client()
            if conn is not None:
                for queue in dispatch.QUEUES:
                    depth.add_metric([queue], int(conn.llen(queue)))
                recorded = conn.hgetall(batching.BATCH_SIZES_KEY)
                counts = {(k if isinstance(k, str) else k.decode()): int(v) for k, v in recorded.items()}
                buckets, total = [], 0
                for bound in (*map(str, batching.BATCH_SIZE_BUCKETS), "+Inf"):
                    total += counts.get(bound, 0)  # Redis keeps each bucket alone; Prometheus's are cumulative
                    buckets.append((bound, float(total)))
                batch_sizes.add_metric([], buckets, float(counts.get("sum", 0)))
        except Exception:
            pass
        yield from (depth, batch_sizes)


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
