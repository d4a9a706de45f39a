"""The broker: Celery's configuration, a publish-only client, and what waits in a queue.

Importing this module installs its publisher for synchronous sessions (`domain.dispatch.use_publisher`).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Any

from celery import Celery

from core.settings import Settings, get_settings
from domain import dispatch
from domain.dispatch import (
    QUEUE_CPU,
    QUEUE_GPU,
    QUEUE_INFERENCE,
    TASK_INFER,
    TASK_RECONCILE,
    TASK_TRAIN,
    TASK_VALIDATE,
    StagedTask,
)

log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Configuration shared by producers (API) and the worker app, by the rules in ARCHITECTURE.md."""
    return {
        "broker_url": settings.resolved_broker_url(),
        # Postgres is the truth: nothing reads task state from the broker.
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": QUEUE_CPU,
        "task_routes": {
            TASK_TRAIN: {"queue": QUEUE_GPU},
            TASK_VALIDATE: {"queue": QUEUE_CPU},
            TASK_INFER: {"queue": QUEUE_INFERENCE},
            TASK_RECONCILE: {"queue": QUEUE_CPU},
            "llmos.webhooks.*": {"queue": QUEUE_CPU},
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_transport_options": {"visibility_timeout": settings.broker_visibility_timeout},
        "broker_connection_retry_on_startup": True,
        # A publish with the broker down must fail fast: the reconciler re-sends later.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        "worker_hijack_root_logger": False,
        "broker_connection_timeout": 3,
    }


@lru_cache(maxsize=1)
def producer() -> Celery:
    """A Celery client that only publishes; it knows tasks by name, so it imports no task code."""
    app = Celery("llmos-producer")
    app.conf.update(celery_config(get_settings()))
    return app


def publish(task: StagedTask) -> bool:
    """Send one task now; False (logged) when the broker cannot take it."""
    try:
        producer().send_task(task.name, args=list(task.args), task_id=task.task_id, queue=task.queue)
        return True
    except Exception:
        log.warning("could not publish %s %s; the reconciler will re-send it", task.name, task.args,
                    exc_info=True)
        return False


def publish_all(tasks: list[StagedTask]) -> None:
    for task in tasks:
        publish(task)


dispatch.use_publisher(publish_all)


def waiting_task_ids(queue: str) -> set[str] | None:
    """Task ids of the messages waiting in a Redis queue; None when the broker cannot be inspected."""
    from infra import replies

    conn = replies.client()
    if conn is None:
        return None
    found: set[str] = set()
    for raw in conn.lrange(queue, 0, -1):
        try:
            found.add(json.loads(raw)["headers"]["id"])
        except (ValueError, KeyError, TypeError):
            continue
    return found
