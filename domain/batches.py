"""The batch state machine, its public object and the events each change writes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from core import ids
from core.clock import unix, utcnow
from core.errors import ServiceError, conflict, not_found
from db import batches as batches_repo
from db import files as files_repo
from db import tenants as tenants_repo
from db.models import Batch
from domain import dispatch, quotas
from domain.events import emit_event
from domain.listing import page
from domain.serving import EMBEDDINGS, ZERO_SHOT, serving_refusal

VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
FAILED = "failed"
EXPIRED = "expired"
CANCELLING = "cancelling"
CANCELLED = "cancelled"

TERMINAL = frozenset({COMPLETED, FAILED, EXPIRED, CANCELLED})
# Statuses in which a worker may still be running lines.
ACTIVE = frozenset({VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING})

TRANSITIONS: dict[str, frozenset[str]] = {
    VALIDATING: frozenset({IN_PROGRESS, FAILED, CANCELLING, CANCELLED, EXPIRED}),
    IN_PROGRESS: frozenset({FINALIZING, CANCELLING, CANCELLED, EXPIRED, FAILED}),
    FINALIZING: frozenset({COMPLETED, FAILED, EXPIRED}),
    CANCELLING: frozenset({CANCELLED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    EXPIRED: frozenset(),
    CANCELLED: frozenset(),
}

EVENT_TYPES = {IN_PROGRESS: "batch.in_progress", COMPLETED: "batch.completed", FAILED: "batch.failed",
               EXPIRED: "batch.expired", CANCELLED: "batch.cancelled"}

# Endpoint → the model task that serves it.
ENDPOINT_TASKS = {"/v1/classifications": "classification", "/v1/ner": "ner", "/v1/embeddings": EMBEDDINGS,
                  "/v1/completions": "generation", "/v1/chat/completions": "generation"}
COMPLETION_WINDOWS = {"24h": 24 * 3600}

# Task names, known to producers without importing task code. Validation and settling run on the cpu
# queue; chunks run on the inference queue, where models are kept warm.
TASK_VALIDATE = "llmos.batches.validate"
TASK_RUN_CHUNK = "llmos.batches.run_chunk"
TASK_SETTLE = "llmos.batches.settle"
TASK_RECONCILE = "llmos.maintenance.reconcile_batches"


class InvalidTransition(Exception):
    def __init__(self, batch: Batch, target: str) -> None:
        super().__init__(f"batch {batch.id} is {batch.status}; it cannot become {target}")


def batch_object(batch: Batch) -> dict[str, Any]:
    """OpenAI's ``batch`` shape: every field present, unset ones null; plus ``webhook_url``."""
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": unix(batch.created_at),
        "in_progress_at": unix(batch.in_progress_at),
        "expires_at": unix(batch.expires_at),
        "finalizing_at": unix(batch.finalizing_at),
        "completed_at": unix(batch.completed_at),
        "failed_at": unix(batch.failed_at),
        "expired_at": unix(batch.expired_at),
        "cancelling_at": unix(batch.cancelling_at),
        "cancelled_at": unix(batch.cancelled_at),
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "metadata": batch.batch_metadata,
        "webhook_url": batch.webhook_url,
    }


def transition(session: Session, batch: Batch, target: str) -> None:
    """Move a loaded (locked) batch to ``target``, stamping ``<target>_at`` and emitting its event."""
    if target not in TRANSITIONS[batch.status]:
        raise InvalidTransition(batch, target)
    now = utcnow()
    batch.status = target
    batch.updated_at = now
    setattr(batch, f"{target}_at", now)
    event_type = EVENT_TYPES.get(target)
    if event_type:
        session.flush()
        emit_event(session, batch.tenant_id, event_type, batch_object(batch))


def error_list(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's ``errors`` shape of a batch."""
    return {"object": "list", "data": errors}


def line_error(code: str, message: str, param: str | None = None, line: int | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def line_task(endpoint: str, body: dict[str, Any]) -> str:
    """The task a line's model must serve: the endpoint's, or zero-shot for classifications with labels."""
    if endpoint == "/v1/classifications" and body.get("labels") is not None:
        return ZERO_SHOT
    return ENDPOINT_TASKS[endpoint]


def serving_problem(conn: Connection, tenant_id: str, model_id: str, task: str) -> dict[str, Any] | None:
    """None if the tenant may run ``task`` on the model, else the line's error (the online endpoints' rules)."""
    refusal = serving_refusal(conn, tenant_id, model_id, task)
    return None if refusal is None else line_error(*refusal, "body.model")


# --------------------------------------------------------------------------------------------------------
# The service. A `webhook_url` passed in must already have passed `domain.webhooks.resolve_safe`.
# --------------------------------------------------------------------------------------------------------


def _batch(session: Session, tenant_id: str, batch_id: str, *, lock: bool = False) -> Batch:
    batch = batches_repo.get_batch(session, tenant_id, batch_id, lock=lock)
    if batch is None:
        raise not_found("batch", batch_id)
    return batch


def create_batch(session: Session, *, tenant_id: str, input_file_id: str, endpoint: str, completion_window: str,
                 metadata: dict[str, str] | None, webhook_url: str | None) -> dict[str, Any]:
    """A new batch, validating its input file; the validation task is sent once the caller commits."""
    source = files_repo.get_file(session, tenant_id, input_file_id)
    if source is None:
        raise ServiceError(400, f"input_file_id: no file with id '{input_file_id}'", param="input_file_id",
                           code="file_not_found")
    if source.purpose != "batch":
        raise ServiceError(400, f"input_file_id: file '{input_file_id}' has purpose '{source.purpose}', not "
                           "'batch'", param="input_file_id", code="invalid_file_purpose")
    now = utcnow()
    batch = Batch(
        id=ids.new_id(ids.BATCH), tenant_id=tenant_id, endpoint=endpoint, input_file_id=input_file_id,
        completion_window=completion_window, status=VALIDATING, batch_metadata=metadata, webhook_url=webhook_url,
        total=0, completed=0, failed=0, chunk_count=0, task_id=ids.random_token(32), heartbeat_at=now,
        created_at=now, updated_at=now, expires_at=now + timedelta(seconds=COMPLETION_WINDOWS[completion_window]),
    )
    session.add(batch)
    session.flush()
    quotas.take(session, tenant_id, "max_active_batches",
                lambda cap: tenants_repo.count_batches(session, tenant_id, ACTIVE, up_to=cap))
    dispatch.enqueue_after_commit(session, TASK_VALIDATE, batch.id, task_id=batch.task_id, queue=dispatch.QUEUE_CPU)
    return batch_object(batch)


def list_batches(session: Session, *, tenant_id: str, after: str | None, limit: int) -> dict[str, Any]:
    return page(batches_repo.list_batches(session, tenant_id, after, limit), batch_object, after)


def get_batch(session: Session, *, tenant_id: str, batch_id: str) -> dict[str, Any]:
    return batch_object(_batch(session, tenant_id, batch_id))


def cancel_batch(session: Session, *, tenant_id: str, batch_id: str) -> dict[str, Any]:
    """Stop a batch; lines already answered are kept."""
    batch = _batch(session, tenant_id, batch_id, lock=True)
    if batch.status in TERMINAL:
        raise conflict(f"batch {batch.id} has already {batch.status}; it cannot be cancelled")
    if batch.status == FINALIZING:
        raise conflict(f"batch {batch.id} is finalizing; every line has been answered")
    if batch.status != CANCELLING:
        batch.stop_reason = "cancelled"
        transition(session, batch, CANCELLING)
        # Finalises at once when no chunk is running; a running chunk stops at its next group and settles.
        dispatch.enqueue_after_commit(session, TASK_SETTLE, batch.id, queue=dispatch.QUEUE_CPU)
    return batch_object(batch)
