"""Sending work to the broker, only after the transaction that made it commits.

Callers stage tasks on the session (`enqueue_after_commit`); an ``after_commit`` hook publishes them.
A publish that fails is logged, not raised: the row is already committed, and the reconciler re-sends
queued work whose task never arrived.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from celery import Celery
from sqlalchemy import event
from sqlalchemy.orm import Session

from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

QUEUE_GPU = "gpu"
QUEUE_INFERENCE = "inference"
QUEUE_CPU = "cpu"

TASK_VALIDATE = "llmos.jobs.validate"
TASK_TRAIN = "llmos.jobs.train"
TASK_INFER = "llmos.inference.run"
TASK_RECONCILE = "llmos.maintenance.reconcile"

_PENDING_KEY = "llmos_pending_tasks"


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


@dataclass(frozen=True)
class StagedTask:
    name: str
    args: tuple[Any, ...]
    task_id: str | None = None
    queue: str | None = None


def enqueue_after_commit(
    session: Session, name: str, *args: Any, task_id: str | None = None, queue: str | None = None,
    once: bool = False,
) -> None:
    """Stage a task on the session; it is sent once the session's transaction commits.

    ``once`` drops a task identical to one already staged (a thousand events for one webhook destination
    need one sender, not a thousand).
    """
    pending = session.info.setdefault(_PENDING_KEY, [])
    task = StagedTask(name, args, task_id, queue)
    if once and task in pending:
        return
    pending.append(task)


def publish(task: StagedTask) -> bool:
    """Send one task now; False (logged) when the broker cannot take it."""
    try:
        producer().send_task(task.name, args=list(task.args), task_id=task.task_id, queue=task.queue)
        return True
    except Exception:
        log.warning("could not publish %s %s; the reconciler will re-send it", task.name, task.args,
                    exc_info=True)
        return False


def take_staged(session: Session) -> list[StagedTask]:
    """Remove and return the tasks staged on ``session``: an async caller commits, then publishes them itself."""
    staged: list[StagedTask] = session.info.pop(_PENDING_KEY, [])
    return staged


def publish_all(tasks: list[StagedTask]) -> None:
    for task in tasks:
        publish(task)


@event.listens_for(Session, "after_commit")
def _publish_staged(session: Session) -> None:
    for task in session.info.pop(_PENDING_KEY, []):
        publish(task)


@event.listens_for(Session, "after_rollback")
def _drop_staged(session: Session) -> None:
    session.info.pop(_PENDING_KEY, None)


def waiting_task_ids(queue: str) -> set[str] | None:
    """Task ids of the messages waiting in a Redis queue; None when the broker cannot be inspected."""
    from domain import replies

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
