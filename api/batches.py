"""Batches: offline inference over an uploaded file (OpenAI's Batch API): create, list, get, cancel."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

from api.deps import Principal, get_session, require
from api.errors import APIError, conflict, not_found
from api.pages import After, Limit, page_body
from api.schemas import CreateBatch
from api.webhooks import check_webhook_url
from db import batches as batches_repo
from db import files as files_repo
from db.models import Batch
from domain import batches, dispatch, ids
from domain.clock import utcnow

router = APIRouter(prefix="/v1/batches", tags=["batches"])
batches_scope = require("batches")


@router.post("", summary="Create a batch")
def create_batch(
    body: CreateBatch, principal: Principal = Depends(batches_scope), session: Session = Depends(get_session)
) -> dict[str, Any]:
    source = files_repo.get_file(session, principal.tenant_id, body.input_file_id)
    if source is None:
        raise APIError(400, f"input_file_id: no file with id '{body.input_file_id}'", param="input_file_id",
                       code="file_not_found")
    if source.purpose != "batch":
        raise APIError(400, f"input_file_id: file '{body.input_file_id}' has purpose '{source.purpose}', not "
                       "'batch'", param="input_file_id", code="invalid_file_purpose")
    if body.webhook_url:
        check_webhook_url(body.webhook_url, "webhook_url")
    now = utcnow()
    batch = Batch(
        id=ids.new_id(ids.BATCH), tenant_id=principal.tenant_id, endpoint=body.endpoint,
        input_file_id=body.input_file_id, completion_window=body.completion_window,
        status=batches.VALIDATING, batch_metadata=body.metadata, webhook_url=body.webhook_url,
        total=0, completed=0, failed=0, chunk_count=0, task_id=ids.random_token(32), heartbeat_at=now,
        created_at=now, updated_at=now,
        expires_at=now + timedelta(seconds=batches.COMPLETION_WINDOWS[body.completion_window]),
    )
    session.add(batch)
    dispatch.enqueue_after_commit(session, batches.TASK_VALIDATE, batch.id, task_id=batch.task_id,
                                  queue=dispatch.QUEUE_CPU)
    session.commit()
    return batches.batch_object(batch)


@router.get("", summary="List batches, newest first")
def list_batches(
    limit: int = Limit,
    after: str | None = After,
    principal: Principal = Depends(batches_scope),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    page = batches_repo.list_batches(session, principal.tenant_id, after, limit)
    return page_body(page, batches.batch_object, after)


def _batch(session: Session, principal: Principal, batch_id: str, *, lock: bool = False) -> Batch:
    batch = batches_repo.get_batch(session, principal.tenant_id, batch_id, lock=lock)
    if batch is None:
        raise not_found("batch", batch_id)
    return batch


@router.get("/{batch_id}", summary="Retrieve a batch")
def get_batch(
    batch_id: str, principal: Principal = Depends(batches_scope), session: Session = Depends(get_session)
) -> dict[str, Any]:
    return batches.batch_object(_batch(session, principal, batch_id))


@router.post("/{batch_id}/cancel", summary="Cancel a batch; lines already answered are kept")
def cancel_batch(
    batch_id: str, principal: Principal = Depends(batches_scope), session: Session = Depends(get_session)
) -> dict[str, Any]:
    batch = _batch(session, principal, batch_id, lock=True)
    if batch.status in batches.TERMINAL:
        raise conflict(f"batch {batch.id} has already {batch.status}; it cannot be cancelled")
    if batch.status == batches.FINALIZING:
        raise conflict(f"batch {batch.id} is finalizing; every line has been answered")
    if batch.status != batches.CANCELLING:
        batch.stop_reason = "cancelled"
        batches.transition(session, batch, batches.CANCELLING)
        # Finalises at once when no chunk is running; a running chunk stops at its next group and settles.
        dispatch.enqueue_after_commit(session, batches.TASK_SETTLE, batch.id, queue=dispatch.QUEUE_CPU)
    session.commit()
    return batches.batch_object(batch)
