"""The fine-tuning job state machine, its public object and the events each change writes."""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import Connection, Row
from sqlalchemy.orm import Session

from core import ids
from core.clock import unix, utcnow
from core.errors import ServiceError, conflict, not_found
from db import files as files_repo
from db import jobs as jobs_repo
from db import registry
from db.models import Checkpoint, FineTuningJob, JobEvent
from domain import dispatch
from domain.events import emit_event
from domain.listing import page

VALIDATING = "validating_files"
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
CANCELLING = "cancelling"
PAUSED = "paused"

TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
# The states in which a worker's claim on the job is live.
CLAIMED = frozenset({RUNNING, CANCELLING})

# Which status may follow which; anything else is a bug or a lost race, never applied.
TRANSITIONS: dict[str, frozenset[str]] = {
    VALIDATING: frozenset({QUEUED, FAILED, CANCELLED}),
    QUEUED: frozenset({RUNNING, PAUSED, CANCELLED, FAILED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLING, PAUSED, QUEUED, CANCELLED}),
    CANCELLING: frozenset({CANCELLED, FAILED, SUCCEEDED}),
    PAUSED: frozenset({QUEUED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

# Outbox event types for the statuses clients subscribe to.
EVENT_TYPES = {
    VALIDATING: "fine_tuning.job.validating_files",
    QUEUED: "fine_tuning.job.queued",
    RUNNING: "fine_tuning.job.running",
    PAUSED: "fine_tuning.job.paused",
    SUCCEEDED: "fine_tuning.job.succeeded",
    FAILED: "fine_tuning.job.failed",
    CANCELLED: "fine_tuning.job.cancelled",
}


class InvalidTransition(Exception):
    def __init__(self, job: FineTuningJob, target: str) -> None:
        super().__init__(f"job {job.id} is {job.status}; it cannot become {target}")
        self.current = job.status
        self.target = target


def job_object(job: FineTuningJob | Row[Any]) -> dict[str, Any]:
    """The public ``fine_tuning.job`` shape: every field present, unset ones null."""
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "model": job.model,
        "status": job.status,
        "task": job.task,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "hyperparameters": job.hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": job.hyperparameters}},
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.tenant_id,
        "finished_at": unix(job.finished_at),
        "estimated_finish": unix(job.estimated_finish),
        "error": job.error,
        "result_files": list(job.result_files or []),
        "trained_tokens": job.trained_tokens,
        "seed": job.seed,
        "metadata": job.job_metadata,
        "user_provided_suffix": job.suffix,
        "integrations": [],
        "progress": job.progress,
        "metrics": job.metrics,
        "attempts": job.attempts,
        "webhook_url": job.webhook_url,
        "priority": job.priority,
    }


def add_job_event(
    session: Session,
    job: FineTuningJob,
    message: str,
    *,
    level: str = "info",
    type_: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    row = JobEvent(
        id=ids.new_id(ids.JOB_EVENT), job_id=job.id, created_at=utcnow(), level=level, type=type_,
        message=message, data=data,
    )
    session.add(row)
    return row


def transition(
    session: Session,
    job: FineTuningJob,
    target: str,
    message: str,
    *,
    level: str = "info",
    error: dict[str, Any] | None = None,
) -> None:
    """Move a loaded (and locked, where racing) job to ``target`` with its job event and outbox event."""
    if target not in TRANSITIONS[job.status]:
        raise InvalidTransition(job, target)
    now = utcnow()
    job.status = target
    job.updated_at = now
    if error is not None:
        job.error = error
    if target in TERMINAL:
        job.finished_at = now
        job.estimated_finish = None
    add_job_event(session, job, message, level=level)
    event_type = EVENT_TYPES.get(target)
    if event_type:
        session.flush()
        emit_event(session, job.tenant_id, event_type, job_object(job))


def failure(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param}


def holds_claim(job: FineTuningJob, attempt: int) -> bool:
    """True while ``attempt`` still owns the job: requeued, paused or finished jobs belong to nobody."""
    return job.attempts == attempt and job.status in CLAIMED


# --------------------------------------------------------------------------------------------------------
# The service: what routers, the CLI and tasks call. Each takes a session and keyword arguments, owns its
# state changes and their events, and leaves the commit to its caller's boundary.
# --------------------------------------------------------------------------------------------------------


def _job(session: Session, tenant_id: str, job_id: str, *, lock: bool = False) -> FineTuningJob:
    job = jobs_repo.get_job(session, tenant_id, job_id, lock=lock)
    if job is None:
        raise not_found("fine_tuning_job", job_id)
    return job


def _check_file(session: Session, tenant_id: str, file_id: str, param: str) -> None:
    row = files_repo.get_file(session, tenant_id, file_id)
    if row is None:
        raise ServiceError(400, f"{param}: no file with id '{file_id}'", param=param, code="file_not_found")
    if row.purpose != "fine-tune":
        raise ServiceError(400, f"{param}: file '{file_id}' has purpose '{row.purpose}', not 'fine-tune'",
                           param=param, code="invalid_file_purpose")


def create_job(
    session: Session,
    *,
    tenant_id: str,
    model: str,
    training_file: str,
    validation_file: str | None = None,
    task: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    metadata: dict[str, str] | None = None,
    webhook_url: str | None = None,
    priority: int = 0,
) -> dict[str, Any]:
    """A new job, validating its files; the validation task is sent once the caller commits.

    ``webhook_url`` must already have passed the address rule (`domain.webhooks.resolve_safe`), which
    resolves DNS and so is the caller's to run where blocking is allowed.
    """
    base = registry.get_visible_model(session, tenant_id, model)
    if base is None:
        raise ServiceError(400, f"model: no model named '{model}'", param="model", code="model_not_found")
    if task and task not in base.tasks:
        raise ServiceError(400, f"model '{model}' cannot be fine-tuned for {task}; it supports "
                           f"{', '.join(base.tasks)}", param="task", code="unsupported_task")
    _check_file(session, tenant_id, training_file, "training_file")
    if validation_file:
        _check_file(session, tenant_id, validation_file, "validation_file")
    job = FineTuningJob(
        id=ids.new_id(ids.JOB), tenant_id=tenant_id, model=model, task=task, status=VALIDATING,
        training_file=training_file, validation_file=validation_file, hyperparameters=hyperparameters or {},
        suffix=suffix, seed=seed if seed is not None else random.randrange(2**31), job_metadata=metadata,
        webhook_url=webhook_url, priority=priority, result_files=[], attempts=0, cancel_requested=False,
        pause_requested=False,
    )
    session.add(job)
    session.flush()
    add_job_event(session, job, f"Validating training file: {training_file}")
    emit_event(session, job.tenant_id, EVENT_TYPES[VALIDATING], job_object(job))
    dispatch.enqueue_after_commit(session, dispatch.TASK_VALIDATE, job.id)
    return job_object(job)


def get_job(conn: Connection, *, tenant_id: str, job_id: str) -> dict[str, Any]:
    """A poll of one job: run on a connection, not a session (see `db.jobs.public_job`)."""
    row = jobs_repo.public_job(conn, tenant_id, job_id)
    if row is None:
        raise not_found("fine_tuning_job", job_id)
    return job_object(row)


def list_jobs(session: Session, *, tenant_id: str, status: str | None, metadata: dict[str, str],
              after: str | None, limit: int) -> dict[str, Any]:
    found = jobs_repo.list_jobs(session, tenant_id, status=status, metadata=metadata, after=after, limit=limit)
    return page(found, job_object, after)


def _refuse_finished(job: FineTuningJob, action: str) -> None:
    if job.status in TERMINAL:
        raise conflict(f"job {job.id} has already {job.status}; it cannot be {action}")


def cancel_job(session: Session, *, tenant_id: str, job_id: str) -> dict[str, Any]:
    job = _job(session, tenant_id, job_id, lock=True)
    _refuse_finished(job, "cancelled")
    job.cancel_requested = True
    if job.status == RUNNING:
        # The worker stops at its next step boundary and records the cancellation.
        transition(session, job, CANCELLING, "Cancellation requested; stopping at the next step")
    elif job.status != CANCELLING:
        transition(session, job, CANCELLED, "Job cancelled")
    return job_object(job)


def pause_job(session: Session, *, tenant_id: str, job_id: str) -> dict[str, Any]:
    job = _job(session, tenant_id, job_id, lock=True)
    _refuse_finished(job, "paused")
    if job.status == QUEUED:
        transition(session, job, PAUSED, "Job paused")
    elif job.status == RUNNING:
        # The worker checkpoints at its next step boundary, then records the pause.
        job.pause_requested = True
        add_job_event(session, job, "Pause requested; checkpointing at the next step")
    elif job.status != PAUSED:
        raise conflict(f"job {job.id} is {job.status}; only queued or running jobs can be paused")
    return job_object(job)


def resume_job(session: Session, *, tenant_id: str, job_id: str) -> dict[str, Any]:
    job = _job(session, tenant_id, job_id, lock=True)
    _refuse_finished(job, "resumed")
    if job.status == PAUSED:
        job.task_id = ids.random_token(32)
        transition(session, job, QUEUED, "Job resumed; queued to continue from its checkpoint")
        dispatch.enqueue_after_commit(session, dispatch.TASK_TRAIN, job.id, task_id=job.task_id)
    elif job.status == RUNNING and job.pause_requested:
        job.pause_requested = False
        add_job_event(session, job, "Pause withdrawn")
    else:
        raise conflict(f"job {job.id} is {job.status}; only paused jobs can be resumed")
    return job_object(job)


def event_object(row: JobEvent) -> dict[str, Any]:
    return {"id": row.id, "object": "fine_tuning.job.event", "created_at": unix(row.created_at),
            "level": row.level, "type": row.type, "message": row.message, "data": row.data}


def checkpoint_object(row: Checkpoint) -> dict[str, Any]:
    return {"id": row.id, "object": "fine_tuning.job.checkpoint", "created_at": unix(row.created_at),
            "fine_tuned_model_checkpoint": row.fine_tuned_model_checkpoint, "step_number": row.step_number,
            "metrics": row.metrics, "fine_tuning_job_id": row.job_id}


def list_events(session: Session, *, tenant_id: str, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
    job = _job(session, tenant_id, job_id)
    return page(jobs_repo.list_events(session, job.id, after, limit), event_object, after)


def events_since(session: Session, *, job_id: str,
                 after_seq: int) -> tuple[list[tuple[int, dict[str, Any]]], str | None]:
    """A live stream's next step: the job's events after ``after_seq`` (seq, object), and its status now."""
    rows = jobs_repo.events_since(session, job_id, after_seq)
    return [(row.seq, event_object(row)) for row in rows], jobs_repo.status_of(session, job_id)


def list_checkpoints(session: Session, *, tenant_id: str, job_id: str, after: str | None,
                     limit: int) -> dict[str, Any]:
    job = _job(session, tenant_id, job_id)
    return page(jobs_repo.list_checkpoints(session, job.id, after, limit), checkpoint_object, after)
