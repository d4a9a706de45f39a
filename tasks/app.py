"""The worker-side Celery app. Task modules import torch lazily, so the main process never touches CUDA."""

from __future__ import annotations

import logging
import os
import threading
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup, worker_process_init, worker_ready, worker_shutting_down

from core.settings import get_settings
from db.session import reset_engine
from domain import dispatch
from infra import broker

log = logging.getLogger(__name__)


def create_celery() -> Celery:
    settings = get_settings()
    app = Celery("llmos")
    app.conf.update(broker.celery_config(settings))
    app.conf.update(
        # Long training tasks: one at a time per process, acknowledged on receipt (early ack), so the
        # broker never redelivers a job that is legitimately running for hours; Postgres tracks it instead.
        worker_prefetch_multiplier=1,
        # Prefork workers (gpu, cpu) replace a pool process that ended within 0.2 s, not 5 s (tasks/pool.py).
        worker_pool="tasks.pool:PromptRefillPool",
        task_acks_late=False,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=max(settings.task_time_limit - 300, 60),
        worker_send_task_events=True,
        task_send_sent_event=True,
        beat_schedule={
            "reconcile": {
                "task": dispatch.TASK_RECONCILE,
                "schedule": timedelta(seconds=settings.reconcile_seconds),
                "options": {"queue": dispatch.QUEUE_CPU, "expires": settings.reconcile_seconds},
            },
            "webhook-retries": {
                "task": "llmos.webhooks.dispatch_due",
                "schedule": timedelta(seconds=settings.webhook_dispatch_seconds),
                "options": {"queue": dispatch.QUEUE_CPU, "expires": max(settings.webhook_dispatch_seconds, 5)},
            },
            "retention": {
                "task": dispatch.TASK_PURGE,
                "schedule": timedelta(hours=1),
                "options": {"queue": dispatch.QUEUE_CPU, "expires": 3600},
            },
            "batches": {
                "task": "llmos.maintenance.reconcile_batches",
                "schedule": timedelta(seconds=settings.reconcile_seconds),
                "options": {"queue": dispatch.QUEUE_CPU, "expires": settings.reconcile_seconds},
            },
        },
    )
    app.conf.include = ["tasks.jobs", "tasks.inference", "tasks.maintenance", "tasks.webhooks", "tasks.batches"]
    return app


celery_app = create_celery()


def serve_only_inference() -> None:
    """Tune this process's app for a worker that consumes only the inference queue (before it starts).

    No ack emulation on the broker connection: the Redis transport would record every message in an
    "unacked" hash and index on receipt and delete it on ack, two pipelines and a new client object per
    request, more than the request's own bookkeeping. What it buys is redelivery of a crashed worker's
    messages after the visibility timeout (hours), long after their callers gave up; the reconciler fails
    such requests instead (`inference_abandon_seconds`). Prefetch stays bounded, in memory.

    No per-task INFO lines (received, succeeded) either: at hundreds of requests a second they cost more CPU
    than the requests' bookkeeping and bury the lines that matter; the API's metrics count and time every
    request, and errors still log at WARNING.

    The models run in a child process of their own (`tasks.serving.EngineProcess`), out of reach of this
    process's GIL; it starts now, so its imports are paid before the first request.
    """
    from tasks import serving

    serving.serve_from_engine_process()
    options = dict(celery_app.conf.broker_transport_options or {})
    celery_app.conf.broker_transport_options = {**options, "ack_emulation": False}
    # Celery sets up logging when the worker starts, after this call; the levels must be set after that.
    celeryd_after_setup.connect(_quiet_task_logs, weak=False)


def _quiet_task_logs(**_: Any) -> None:
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)


@worker_process_init.connect
def _init_worker_process(**_: Any) -> None:
    # Sent by the prefork pool only: a threads pool (the inference-only worker) shares the main process's
    # database engine, and its models run in a model process that imports the training code itself.
    # A forked pool process must not reuse the parent's pooled database sockets.
    reset_engine()
    if "inference" in os.environ.get("LLMOS_WORKER_QUEUES", "").split(","):
        # Pay torch/transformers imports at start-up, not on the first request.
        import training.predict  # noqa: F401


_advertising: list[tuple[threading.Thread, threading.Event]] = []


@worker_ready.connect
def _advertise_training_capacity(sender: Any = None, **_: Any) -> None:
    """A training worker tells Postgres how many ranks it offers, for as long as it runs."""
    if "gpu" not in os.environ.get("LLMOS_WORKER_QUEUES", "").split(","):
        return
    from tasks.capacity import advertise_capacity

    stop = threading.Event()
    name = getattr(sender, "hostname", None) or f"worker-{os.getpid()}"
    thread = threading.Thread(target=advertise_capacity, args=(name, stop), name="llmos-capacity", daemon=True)
    thread.start()
    _advertising.append((thread, stop))


@worker_shutting_down.connect
def _ask_training_to_checkpoint(**_: Any) -> None:
    """A warm shutdown would wait hours for training to end: tell pool processes to checkpoint and stop."""
    if "gpu" not in os.environ.get("LLMOS_WORKER_QUEUES", "").split(","):
        return
    import signal

    import psutil

    for child in psutil.Process().children():
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            continue
    # After the children are told (any delay before that lands their signal after training has already
    # restored the default handler): a stopping worker takes no new job, so its offer is withdrawn.
    for thread, stop in _advertising:
        stop.set()
        thread.join(timeout=5)
