"""Fine-tuning jobs: create, list, get, cancel, pause, resume, events, checkpoints."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import Principal, get_session, require
from api.errors import APIError, conflict, not_found
from api.pages import After, Limit, page_body
from api.schemas import CreateJob
from api.webhooks import check_webhook_url
from db import files as files_repo
from db import jobs as jobs_repo
from db import registry
from db.models import Checkpoint, FineTuningJob, JobEvent
from db.session import session_factory
from domain import dispatch, ids, jobs
from domain.clock import unix
from domain.events import emit_event

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
fine_tuning = require("fine_tuning")


def _check_file(session: Session, principal: Principal, file_id: str, param: str) -> None:
    row = files_repo.get_file(session, principal.tenant_id, file_id)
    if row is None:
        raise APIError(400, f"{param}: no file with id '{file_id}'", param=param, code="file_not_found")
    if row.purpose != "fine-tune":
        raise APIError(400, f"{param}: file '{file_id}' has purpose '{row.purpose}', not 'fine-tune'",
                       param=param, code="invalid_file_purpose")


@router.post("", summary="Create a fine-tuning job")
def create_job(
    body: CreateJob, principal: Principal = Depends(fine_tuning), session: Session = Depends(get_session)
) -> dict[str, Any]:
    model = registry.get_visible_model(session, principal.tenant_id, body.model)
    if model is None:
        raise APIError(400, f"model: no model named '{body.model}'", param="model", code="model_not_found")
    if body.task and body.task not in model.tasks:
        raise APIError(400, f"model '{body.model}' cannot be fine-tuned for {body.task}; it supports "
                       f"{', '.join(model.tasks)}", param="task", code="unsupported_task")
    _check_file(session, principal, body.training_file, "training_file")
    if body.webhook_url:
        check_webhook_url(body.webhook_url, "webhook_url")
    if body.validation_file:
        _check_file(session, principal, body.validation_file, "validation_file")
    job = FineTuningJob(
        id=ids.new_id(ids.JOB), tenant_id=principal.tenant_id, model=body.model, task=body.task,
        status=jobs.VALIDATING, training_file=body.training_file, validation_file=body.validation_file,
        hyperparameters=body.resolved_hyperparameters(), suffix=body.suffix,
        seed=body.seed if body.seed is not None else random.randrange(2**31),
        job_metadata=body.metadata, webhook_url=body.webhook_url, priority=body.priority or 0,
        result_files=[], attempts=0, cancel_requested=False, pause_requested=False,
    )
    session.add(job)
    session.flush()
    jobs.add_job_event(session, job, f"Validating training file: {body.training_file}")
    emit_event(session, job.tenant_id, jobs.EVENT_TYPES[jobs.VALIDATING], jobs.job_object(job))
    dispatch.enqueue_after_commit(session, dispatch.TASK_VALIDATE, job.id)
    session.commit()
    return jobs.job_object(job)


@router.get("", summary="List fine-tuning jobs")
def list_jobs(
    request: Request,
    status: str | None = Query(None, max_length=32),
    limit: int = Limit,
    after: str | None = After,
    principal: Principal = Depends(fine_tuning),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    metadata = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    page = jobs_repo.list_jobs(session, principal.tenant_id, status=status, metadata=metadata,
                               after=after, limit=limit)
    return page_body(page, jobs.job_object, after)


def _job(session: Session, principal: Principal, job_id: str, *, lock: bool = False) -> FineTuningJob:
    job = jobs_repo.get_job(session, principal.tenant_id, job_id, lock=lock)
    if job is None:
        raise not_found("fine_tuning_job", job_id)
    return job


@router.get("/{job_id}", summary="Retrieve a fine-tuning job")
def get_job(
    job_id: str, principal: Principal = Depends(fine_tuning), session: Session = Depends(get_session)
) -> dict[str, Any]:
    return jobs.job_object(_job(session, principal, job_id))


def _refuse_finished(job: FineTuningJob, action: str) -> None:
    if job.status in jobs.TERMINAL:
        raise conflict(f"job {job.id} has already {job.status}; it cannot be {action}")


@router.post("/{job_id}/cancel", summary="Cancel a fine-tuning job")
def cancel_job(
    job_id: str, principal: Principal = Depends(fine_tuning), session: Session = Depends(get_session)
) -> dict[str, Any]:
    job = _job(session, principal, job_id, lock=True)
    _refuse_finished(job, "cancelled")
    job.cancel_requested = True
    if job.status == jobs.RUNNING:
        # The worker stops at its next step boundary and records the cancellation.
        jobs.transition(session, job, jobs.CANCELLING, "Cancellation requested; stopping at the next step")
    elif job.status != jobs.CANCELLING:
        jobs.transition(session, job, jobs.CANCELLED, "Job cancelled")
    session.commit()
    return jobs.job_object(job)


@router.post("/{job_id}/pause", summary="Pause a fine-tuning job (extension)")
def pause_job(
    job_id: str, principal: Principal = Depends(fine_tuning), session: Session = Depends(get_session)
) -> dict[str, Any]:
    job = _job(session, principal, job_id, lock=True)
    _refuse_finished(job, "paused")
    if job.status == jobs.QUEUED:
        jobs.transition(session, job, jobs.PAUSED, "Job paused")
    elif job.status == jobs.RUNNING:
        # The worker checkpoints at its next step boundary, then records the pause.
        job.pause_requested = True
        jobs.add_job_event(session, job, "Pause requested; checkpointing at the next step")
    elif job.status != jobs.PAUSED:
        raise conflict(f"job {job.id} is {job.status}; only queued or running jobs can be paused")
    session.commit()
    return jobs.job_object(job)


@router.post("/{job_id}/resume", summary="Resume a paused fine-tuning job (extension)")
def resume_job(
    job_id: str, principal: Principal = Depends(fine_tuning), session: Session = Depends(get_session)
) -> dict[str, Any]:
    job = _job(session, principal, job_id, lock=True)
    _refuse_finished(job, "resumed")
    if job.status == jobs.PAUSED:
        job.task_id = ids.random_token(32)
        jobs.transition(session, job, jobs.QUEUED, "Job resumed; queued to continue from its checkpoint")
        dispatch.enqueue_after_commit(session, dispatch.TASK_TRAIN, job.id, task_id=job.task_id)
    elif job.status == jobs.RUNNING and job.pause_requested:
        job.pause_requested = False
        jobs.add_job_event(session, job, "Pause withdrawn")
    else:
        raise conflict(f"job {job.id} is {job.status}; only paused jobs can be resumed")
    session.commit()
    return jobs.job_object(job)


def event_object(row: JobEvent) -> dict[str, Any]:
    return {"id": row.id, "object": "fine_tuning.job.event", "created_at": unix(row.created_at),
            "level": row.level, "type": row.type, "message": row.message, "data": row.data}


@router.get("/{job_id}/events", summary="List a job's events, newest first; ?stream=true for live SSE")
def list_events(
    job_id: str,
    limit: int = Limit,
    after: str | None = After,
    stream: bool = Query(False, description="Serve the events live as Server-Sent Events until the job ends."),
    principal: Principal = Depends(fine_tuning),
    session: Session = Depends(get_session),
) -> Any:
    job = _job(session, principal, job_id)
    if stream:
        return StreamingResponse(_event_stream(job.id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return page_body(jobs_repo.list_events(session, job.id, after, limit), event_object, after)


STREAM_POLL_SECONDS = 0.5


def _event_stream(job_id: str) -> Iterator[str]:
    """Every event oldest first, then new ones as they are written, until the job is terminal."""
    last_seq = 0
    while True:
        with session_factory()() as session:
            rows = jobs_repo.events_since(session, job_id, last_seq)
            status = session.scalar(select(FineTuningJob.status).where(FineTuningJob.id == job_id))
        for row in rows:
            last_seq = row.seq
            yield f"id: {row.id}\nevent: {row.type}\ndata: {json.dumps(event_object(row))}\n\n"
        if status is None or status in jobs.TERMINAL:
            yield f"event: done\ndata: {json.dumps({'status': status})}\n\n"
            return
        if not rows:
            yield ": keep-alive\n\n"
            time.sleep(STREAM_POLL_SECONDS)


def checkpoint_object(row: Checkpoint) -> dict[str, Any]:
    return {"id": row.id, "object": "fine_tuning.job.checkpoint", "created_at": unix(row.created_at),
            "fine_tuned_model_checkpoint": row.fine_tuned_model_checkpoint, "step_number": row.step_number,
            "metrics": row.metrics, "fine_tuning_job_id": row.job_id}


@router.get("/{job_id}/checkpoints", summary="List a job's checkpoints, newest first")
def list_checkpoints(
    job_id: str,
    limit: int = Limit,
    after: str | None = After,
    principal: Principal = Depends(fine_tuning),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    job = _job(session, principal, job_id)
    return page_body(jobs_repo.list_checkpoints(session, job.id, after, limit), checkpoint_object, after)
