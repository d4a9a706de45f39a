"""The fine-tuning job state machine, its public object and the events each change writes."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from db.models import FineTuningJob, JobEvent
from domain import ids
from domain.clock import unix, utcnow
from domain.events import emit_event

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


def job_object(job: FineTuningJob) -> dict[str, Any]:
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
