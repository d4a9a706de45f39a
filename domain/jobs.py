"""The fine-tuning job state machine, its public object and the events each change writes."""

from __future__ import annotations

import random
import re
import socket
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row
from sqlalchemy.orm import Session

from core import ids
from core.clock import unix, utcnow
from core.errors import ServiceError, conflict, not_found
from core.settings import get_settings
from db import files as files_repo
from db import jobs as jobs_repo
from db import registry
from db import tenants as tenants_repo
from db.models import Checkpoint, File, FineTuningJob, JobEvent, Model
from domain import dispatch, quotas
from domain.events import emit_event
from domain.listing import page
from training.hyperparameters import method_of

VALIDATING = "validating_files"
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
CANCELLING = "cancelling"
PAUSED = "paused"

TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
# Jobs that count against the tenant's `max_active_jobs`.
ACTIVE = frozenset({VALIDATING, QUEUED, RUNNING, CANCELLING, PAUSED})
# The `kind` of a model that is a job's checkpoint (`ft:…:ckpt-step-N`); fine-tuned models are "fine-tuned".
CHECKPOINT_KIND = "checkpoint"
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


def method_object(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `method`: a stored `beta` marks a DPO job (see `training.hyperparameters.method_of`)."""
    kind = method_of(hyperparameters)
    return {"type": kind, kind: {"hyperparameters": hyperparameters}}


def job_object(job: FineTuningJob | Row[Any], queue_position: int | None = None) -> dict[str, Any]:
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
        "method": method_object(job.hyperparameters or {}),
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
        "integrations": list(job.integrations or []),
        "progress": job.progress,
        "metrics": job.metrics,
        "attempts": job.attempts,
        "webhook_url": job.webhook_url,
        "priority": job.priority,
        "queue_position": queue_position if job.status == QUEUED else None,
        "compute": {"processes": job.processes},
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
    if target not in CLAIMED:
        # An estimate is of a running job's pace: queued, paused and finished jobs have none.
        job.estimated_finish = None
    if target == QUEUED:
        job.queued_at = now
    add_job_event(session, job, message, level=level)
    event_type = EVENT_TYPES.get(target)
    if event_type:
        session.flush()
        emit_event(session, job.tenant_id, event_type, job_object(job))


def fair() -> bool:
    return get_settings().scheduler == "fair"


def offer_for_validation(session: Session, job: FineTuningJob) -> None:
    """A validation ticket on the cpu queue, sent when the caller commits.

    Like a training ticket it names no job to run: the worker that takes it validates whichever waiting job
    is next in the fair order (`db.jobs.claim_next_validation`), so the broker's first-come order never lets
    one tenant's burst of jobs hold another's in validation. Its id marks it as a validation ticket, which is
    how the reconciler counts the tickets still waiting.
    """
    dispatch.enqueue_after_commit(session, dispatch.TASK_VALIDATE, job.id, task_id=dispatch.validation_ticket_id())


def offer_to_workers(session: Session, job: FineTuningJob) -> None:
    """Put a queued job in line: a ticket on the training queue, sent when the caller commits.

    A ticket names no job to run. The worker that takes it is free, and asks the scheduler then which job
    is next (`db.jobs.claim_next`): admission is decided in Postgres at the moment a worker can start, so
    the broker's order never decides who trains first. A ticket that finds nothing queued does nothing.
    """
    dispatch.enqueue_after_commit(session, dispatch.TASK_TRAIN, job.id, queue=dispatch.training_queue(job.processes))


def note_if_too_wide(session: Session, job: FineTuningJob) -> None:
    """A queued job wider than every live training worker gets an event saying why it waits.

    It stays queued (a wider worker may start later; its ticket waits on that width's queue): the event is
    what tells the client and the operator that, as things stand, nothing will run it.
    """
    if job.processes <= 1:
        return  # every training worker offers one rank
    seen_since = utcnow() - timedelta(seconds=get_settings().stale_heartbeat_seconds)
    largest = jobs_repo.largest_offer(session, seen_since)
    if largest is not None and largest >= job.processes:
        return
    offered = ("no training worker is running" if largest is None
               else f"the largest live training worker offers {largest}")
    add_job_event(session, job, f"Waiting for a training worker that runs {job.processes} processes: {offered} "
                  "(each worker's LLMOS_WORKER_PROCESSES)", level="warn")


def note_integration_run(session: Session, job_id: str, index: int, run_id: str) -> None:
    """Keep a tracker's run id on its integration entry: later attempts log to the same run, and the client
    sees which run it is."""
    job = jobs_repo.get_job_by_id(session, job_id, lock=True)
    if job is None or not job.integrations or index >= len(job.integrations):
        return
    entries = [dict(entry) for entry in job.integrations]
    kind = entries[index]["type"]
    entries[index][kind] = {**entries[index][kind], "run_id": run_id}
    job.integrations = entries


def lose_attempt(session: Session, job: FineTuningJob, message: str) -> str:
    """The attempt's worker is gone (it stopped answering, or one of its training ranks was killed): requeue the
    job to resume from its last checkpoint, or fail it once workers were lost `max_attempts` times. Returns the
    job's new status."""
    settings = get_settings()
    jobs_repo.release_claim(session, job.id, job.attempts, "lost")
    if job.status == CANCELLING:
        transition(session, job, CANCELLED, f"{message} while cancelling; job cancelled")
    elif (lost := jobs_repo.lost_claims(session, job.id)) >= settings.max_attempts:
        reason = f"the worker was lost {lost} times; giving up after {settings.max_attempts} attempts"
        transition(session, job, FAILED, f"Job failed: {reason}", level="error",
                   error=failure("worker_lost", reason))
    else:
        transition(session, job, QUEUED, f"{message}; requeued", level="warn")
        offer_to_workers(session, job)
    return job.status


# An absolute path of two or more parts, as exceptions quote them ("/srv/llmos/artifacts/…/model.bin").
_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@%+=,-]+/)+[\w.@%+=,-]*")


def scrub(message: str) -> str:
    """A message fit for a client: no server paths and no host name (exceptions from training quote both)."""
    message = _PATH.sub("<path>", message)
    host = socket.gethostname()
    return message.replace(host, "<host>") if len(host) > 2 else message


def failure(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """A job's `error`; its message scrubbed of server paths and host names."""
    return {"code": code, "message": scrub(message), "param": param}


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
    processes: int = 1,
    integrations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A new job, validating its files; the validation task is sent once the caller commits.

    ``webhook_url`` must already have passed the address rule (`domain.webhooks.resolve_safe`), which
    resolves DNS and so is the caller's to run where blocking is allowed.
    """
    base = registry.get_visible_model(session, tenant_id, model)
    if base is None:
        raise ServiceError(400, f"model: no model named '{model}'", param="model", code="model_not_found")
    if method_of(hyperparameters or {}) == "dpo" and "generation" not in base.tasks:
        raise ServiceError(400, f"method: DPO trains generation models; '{model}' supports "
                           f"{', '.join(base.tasks)}", param="method", code="unsupported_method")
    if method_of(hyperparameters or {}) == "dpo" and task not in (None, "generation"):
        raise ServiceError(400, f"method: DPO trains generation models, not {task}", param="task",
                           code="unsupported_method")
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
        webhook_url=webhook_url, priority=priority, processes=processes, integrations=integrations or None,
        result_files=[], attempts=0, cancel_requested=False, pause_requested=False,
    )
    session.add(job)
    session.flush()
    add_job_event(session, job, f"Validating training file: {training_file}")
    emit_event(session, job.tenant_id, EVENT_TYPES[VALIDATING], job_object(job))
    quotas.take(session, tenant_id, "max_active_jobs",
                lambda cap: tenants_repo.count_jobs(session, tenant_id, ACTIVE, up_to=cap))
    offer_for_validation(session, job)
    return job_object(job)


def get_job(conn: Connection, *, tenant_id: str, job_id: str) -> dict[str, Any]:
    """A poll of one job: run on a connection, not a session (see `db.jobs.public_job`)."""
    row = jobs_repo.public_job(conn, tenant_id, job_id)
    if row is None:
        raise not_found("fine_tuning_job", job_id)
    position = None
    if row.status == QUEUED:
        position = jobs_repo.queue_positions(conn, tenant_id, fair=fair()).get(job_id)
    return job_object(row, position)


def list_jobs(session: Session, *, tenant_id: str, status: str | None, metadata: dict[str, str],
              after: str | None, limit: int) -> dict[str, Any]:
    found = jobs_repo.list_jobs(session, tenant_id, status=status, metadata=metadata, after=after, limit=limit)
    positions: dict[str, int] = {}
    if found is not None and any(job.status == QUEUED for job in found.items):
        positions = jobs_repo.queue_positions(session, tenant_id, fair=fair())
    return page(found, lambda job: job_object(job, positions.get(job.id)), after)


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
        transition(session, job, QUEUED, "Job resumed; queued to continue from its checkpoint")
        offer_to_workers(session, job)
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


# Events a live stream reads at once; a full page means more may be waiting.
STREAM_PAGE = 500


def events_since(session: Session, *, job_id: str,
                 after_seq: int) -> tuple[list[tuple[int, dict[str, Any]]], str | None]:
    """A live stream's next step: the job's events after ``after_seq`` (seq, object), and its status.

    The status is read first: a status change commits with its events, so once a terminal status is seen,
    the events read after it include every event the job will ever have.
    """
    status = jobs_repo.status_of(session, job_id)
    rows = jobs_repo.events_since(session, job_id, after_seq, STREAM_PAGE)
    return [(row.seq, event_object(row)) for row in rows], status


def list_checkpoints(session: Session, *, tenant_id: str, job_id: str, after: str | None,
                     limit: int) -> dict[str, Any]:
    job = _job(session, tenant_id, job_id)
    return page(jobs_repo.list_checkpoints(session, job.id, after, limit), checkpoint_object, after)


# --------------------------------------------------------------------------------------------------------
# How a training attempt ends: called by the training task, which has already written the artifacts.
# Each acts only while ``attempt`` still holds the job (a newer attempt or a cancel may have moved on).
# --------------------------------------------------------------------------------------------------------


def _claimed(session: Session, job_id: str, attempt: int) -> FineTuningJob | None:
    job = jobs_repo.get_job_by_id(session, job_id, lock=True)
    return job if job is not None and holds_claim(job, attempt) else None


def fail_over_runtime(session: Session, job: FineTuningJob, attempt: int, limit: float, step: int | None) -> None:
    """Fail a job whose attempts used up `max_runtime_seconds`."""
    where = f" at step {step}" if step is not None else ""
    message = (f"the job exceeded its maximum runtime of {limit:.0f} s{where}; raise "
               "hyperparameters.max_runtime_seconds to train longer")
    transition(session, job, FAILED, f"Job stopped: {message}", level="error",
               error=failure("max_runtime_exceeded", message, "hyperparameters.max_runtime_seconds"))
    jobs_repo.release_claim(session, job.id, attempt, "time_limit")


def end_runaway_attempt(session: Session, *, job_id: str, attempt: int, limit: float) -> None:
    """The hard limit: a step that did not return within the grace fails the job."""
    job = _claimed(session, job_id, attempt)
    if job is not None:
        fail_over_runtime(session, job, attempt, limit, (job.progress or {}).get("step"))


def fail_attempt(session: Session, *, job_id: str, attempt: int, message: str) -> None:
    """Training raised: the job fails with `training_error`."""
    job = _claimed(session, job_id, attempt)
    if job is None:
        return
    transition(session, job, FAILED, f"Training failed: {scrub(message)}", level="error",
               error=failure("training_error", message))
    jobs_repo.release_claim(session, job_id, attempt, "failed")


def stop_attempt(session: Session, *, job_id: str, attempt: int, reason: str | None, step: int) -> bool:
    """Training stopped before the end at ``step``: cancelled, paused, out of time, or handed back to the queue
    (the worker shutting down). True when the job was cancelled, so the caller may delete its checkpoints."""
    job = _claimed(session, job_id, attempt)
    if job is None:
        return False
    if reason == "cancel":
        transition(session, job, CANCELLED, f"Job cancelled at step {step}")
        # The caller deletes a cancelled job's checkpoints: they stop being models now.
        registry.retire_checkpoints(session, job_id)
    elif reason == "time_limit":
        fail_over_runtime(session, job, attempt, float((job.hyperparameters or {}).get("max_runtime_seconds", 0)),
                          step)
        return False
    elif reason == "pause":
        job.pause_requested = False
        transition(session, job, PAUSED, f"Job paused at step {step}")
    else:
        # Worker shutdown: hand the job back so another worker continues from the checkpoint.
        transition(session, job, QUEUED, f"Worker shutting down; requeued at step {step}")
        offer_to_workers(session, job)
    jobs_repo.release_claim(session, job_id, attempt, reason or "stopped")
    return reason == "cancel"


def record_checkpoint(session: Session, job: FineTuningJob, *, step: int, location: str, metrics: dict[str, Any],
                      model_name: str, kept_steps: set[int]) -> None:
    """A checkpoint was saved (and uploaded): list it, and make it a model of the job's tenant.

    `ft:…:ckpt-step-N` serves on every inference route and is a base for new jobs, like the final model.
    Checkpoints the trainer has since pruned (not in ``kept_steps``) stop being models.
    """
    name = checkpoint_model_id(model_name, step)
    existing = jobs_repo.checkpoint_at(session, job.id, step)
    if existing is not None:
        # A resumed attempt saved the same step again.
        existing.path, existing.metrics = location, metrics
    else:
        session.add(Checkpoint(id=ids.new_id(ids.CHECKPOINT), job_id=job.id, step_number=step, metrics=metrics,
                               path=location, fine_tuned_model_checkpoint=name))
        add_job_event(session, job, f"Checkpoint saved at step {step}")
    base = session.get(Model, job.model)
    model = session.get(Model, name)
    if model is None:
        model = Model(id=name, tenant_id=job.tenant_id, owned_by=job.tenant_id, kind=CHECKPOINT_KIND,
                      tasks=[job.task or "classification"], architecture=base.architecture if base else "unknown",
                      base_model=_root_of(base) if base else job.model, job_id=job.id,
                      description=f"{job.task} fine-tune of {job.model}, step {step}")
        session.add(model)
    model.path, model.deleted_at = location, None
    registry.retire_checkpoints(session, job.id, keep={checkpoint_model_id(model_name, s) for s in kept_steps})


def checkpoint_model_id(model_name: str, step: int) -> str:
    """`ft:…:ckpt-step-N`: the model a job's checkpoint at step N is (OpenAI's `fine_tuned_model_checkpoint`)."""
    return f"{model_name}:ckpt-step-{step}"


def _root_of(base: Model) -> str:
    """The base model at the root of a chain of continued trainings."""
    return base.id if base.kind == "base" else (base.base_model or base.id)


def record_success(session: Session, *, job_id: str, attempt: int, model_name: str, base: Model,
                   model_dir: str, metrics: dict[str, Any], trained_tokens: int, step: int,
                   results_location: str, results_bytes: int) -> None:
    """Training completed: the results file and the fine-tuned model (their `domain.storage` locations) are
    recorded, and the job succeeds."""
    job = _claimed(session, job_id, attempt)
    if job is None:
        return
    results_file = File(
        id=ids.new_id(ids.FILE), tenant_id=job.tenant_id, filename="step_metrics.csv",
        purpose="fine-tune-results", bytes=results_bytes, sha256="", path=results_location,
    )
    session.add(results_file)
    model = Model(
        id=model_name, tenant_id=job.tenant_id, owned_by=job.tenant_id, kind="fine-tuned",
        tasks=[job.task or "classification"], architecture=base.architecture, path=model_dir,
        base_model=_root_of(base), job_id=job.id,
        description=f"{job.task} fine-tune of {base.id}",
    )
    session.add(model)
    job.fine_tuned_model = model_name
    job.metrics = metrics
    job.trained_tokens = trained_tokens
    job.result_files = [results_file.id]
    if job.progress:
        job.progress = {**job.progress, "step": step, "percent": 100.0}
    job.cancel_requested = False
    session.flush()
    emit_event(session, job.tenant_id, "model.created",
               {"id": model_name, "object": "model", "owned_by": job.tenant_id, "fine_tuning_job": job.id,
                "created": unix(utcnow())})
    transition(session, job, SUCCEEDED, f"Job succeeded: {model_name}")
    jobs_repo.release_claim(session, job_id, attempt, "succeeded")


def purge_aged_checkpoints(session: Session, finished_before: datetime) -> list[str]:
    """Checkpoints of jobs finished before ``finished_before`` stop being models; returns their locations,
    for the caller to delete once this commits (deleting first could leave a model row without files)."""
    return [row.path for row in registry.retire_checkpoints_of(registry.aged_checkpoints(session, finished_before))]

