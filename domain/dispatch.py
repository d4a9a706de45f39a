"""Work for the broker, staged on a session and sent only after the transaction that made it commits.

Services stage tasks on their session (`enqueue_after_commit`); they never import the broker. After a
synchronous session commits, the publisher the process installed (`use_publisher`, done by `infra.broker`
on import) sends them; an asyncio caller takes them (`take_staged`) and sends them itself after its commit.
A publish that fails is logged, not raised: the row is already committed, and the reconciler re-sends queued
work whose task never arrived.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

QUEUE_GPU = "gpu"
QUEUE_INFERENCE = "inference"
QUEUE_CPU = "cpu"
# Webhook senders: a slow receiver holds one of these, never a validation, a batch or the reconciler.
QUEUE_WEBHOOKS = "webhooks"
QUEUES = (QUEUE_GPU, QUEUE_INFERENCE, QUEUE_CPU, QUEUE_WEBHOOKS)



def training_queue(processes: int) -> str:
    """The queue of a training ticket for a job of ``processes`` ranks: `gpu`, or `gpu.pN` for N ≥ 2.

    A worker offering N ranks consumes `gpu` and `gpu.p2` … `gpu.pN`, so a wide job's ticket reaches only a
    worker that can hold it, and a ticket a narrower worker passes on (`tasks.jobs.train_job`) moves only to a
    wider queue: it can never circle between workers that cannot run it.
    """
    return QUEUE_GPU if processes <= 1 else f"{QUEUE_GPU}.p{processes}"


def training_queues(capacity: int) -> list[str]:
    """Every queue a training worker offering ``capacity`` ranks consumes."""
    return [training_queue(n) for n in range(1, max(1, capacity) + 1)]


TASK_VALIDATE = "llmos.jobs.validate"
TASK_TRAIN = "llmos.jobs.train"
TASK_INFER = "llmos.inference.run"
TASK_RECONCILE = "llmos.maintenance.reconcile"
TASK_PURGE = "llmos.maintenance.purge"

_PENDING_KEY = "llmos_pending_tasks"

# Validation tickets carry ids with this prefix, so the reconciler can tell them from other cpu-queue work.
VALIDATION_TICKET_PREFIX = "validate-"


def validation_ticket_id() -> str:
    return f"{VALIDATION_TICKET_PREFIX}{uuid.uuid4().hex}"


@dataclass(frozen=True)
class StagedTask:
    name: str
    args: tuple[Any, ...]
    task_id: str | None = None
    queue: str | None = None


Publisher = Callable[[list[StagedTask]], None]
_publisher: Publisher | None = None


def use_publisher(publish: Publisher) -> None:
    """Install how this process sends tasks after a synchronous session commits."""
    global _publisher
    _publisher = publish


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


def take_staged(session: Session) -> list[StagedTask]:
    """Remove and return the tasks staged on ``session``: an async caller commits, then publishes them itself."""
    staged: list[StagedTask] = session.info.pop(_PENDING_KEY, [])
    return staged


@event.listens_for(Session, "after_commit")
def _publish_staged(session: Session) -> None:
    tasks = take_staged(session)
    if not tasks:
        return
    if _publisher is None:
        # Not silent: a process that stages work must install a publisher (import infra.broker).
        log.error("no task publisher in this process; %d tasks not sent (the reconciler re-sends them): %s",
                  len(tasks), [t.name for t in tasks])
        return
    _publisher(tasks)


@event.listens_for(Session, "after_rollback")
def _drop_staged(session: Session) -> None:
    session.info.pop(_PENDING_KEY, None)
