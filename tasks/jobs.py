"""Fine-tuning job tasks: validate the files (queue cpu), then train (queue gpu).

Tasks take a job ID, load the row, re-check its state, and are idempotent: a duplicate delivery finds
nothing to do.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

from celery import Task

from core.settings import get_settings
from db import jobs as jobs_repo
from db.models import File, FineTuningJob, Model
from db.session import transaction, unreachable, when_reachable
from domain import dispatch, jobs, storage
from domain.events import emit_event
from domain.storage import job_dir
from infra import objectstore  # noqa: F401  (installs the object store for LLMOS_STORAGE_URL)
from tasks import recipes
from tasks.app import celery_app
from tasks.capacity import worker_capacity
from tasks.integrations import end_trackers, start_trackers
from tasks.progress import OUTAGE_WAIT_SECONDS, JobReporter
from training.hyperparameters import method_of

log = logging.getLogger(__name__)



def worker_name(task: Task) -> str:
    return f"{task.request.hostname or socket.gethostname()}:{os.getpid()}"


def fine_tuned_model_id(job: FineTuningJob, base: Model, tenant_name: str) -> str:
    """``ft:<base>:<tenant>:<suffix>:<job>``, naming the root base model even for continued training."""
    root = base.base_model if base.kind != "base" and base.base_model else base.id
    return f"ft:{root}:{tenant_name}:{job.suffix or ''}:{job.id}"


def _file_location(session: Any, job: FineTuningJob, file_id: str | None) -> str | None:
    if file_id is None:
        return None
    row = session.get(File, file_id)
    if row is None or row.tenant_id != job.tenant_id or row.deleted_at is not None:
        raise FileNotFoundError(file_id)
    return row.path


def _local(location: str | None) -> Path | None:
    return None if location is None else storage.materialize(location)


@celery_app.task(name=dispatch.TASK_VALIDATE)
def validate_job(offered_by: str | None = None) -> None:
    """A validation ticket (`jobs.offer_for_validation`): validate the job the fair order picks now.

    ``offered_by`` is the job whose creation sent this ticket, for the log; the job validated may be another
    tenant's, whose turn it is. A ticket that finds every waiting job taken does nothing.
    """
    max_attempts = get_settings().max_attempts
    # A few tries: a job another worker took between our pick and our lock sends us to the next one.
    for _ in range(5):
        with transaction() as session:
            job_id = jobs_repo.claim_next_validation(session, fair=jobs.fair(), max_attempts=max_attempts)
        if job_id is None:
            log.info("validate (ticket of %s): no job waits for validation", offered_by)
            return
        if _validate(job_id):
            return


def _validate(job_id: str) -> bool:
    """validating_files → queued (and send a training ticket), or failed with the lines at fault; False when
    the job no longer waits for validation."""
    from training.data import DataError

    with transaction() as session:
        job = jobs_repo.get_job_by_id(session, job_id, lock=True)
        if job is None or job.status != jobs.VALIDATING:
            log.info("validate %s: nothing to do (%s)", job_id, job and job.status)
            return False
        try:
            base = session.get(Model, job.model)
            model_tasks = list(base.tasks) if base is not None else []
            which = "training_file"
            train_path = _local(_file_location(session, job, job.training_file))
            assert train_path is not None
            method = method_of(job.hyperparameters or {})
            # Streamed: validation holds one row at a time, whatever the file's size.
            task, rows = recipes.check_rows(train_path, job.task, model_tasks, method)
            which = "validation_file"
            valid_path = _local(_file_location(session, job, job.validation_file))
            if valid_path is not None:
                recipes.check_rows(valid_path, task, model_tasks, method)
            which = "hyperparameters"
            requested = dict(job.hyperparameters or {})
            max_runtime = int(requested.pop("max_runtime_seconds", None) or get_settings().max_job_runtime_seconds)
            hyperparameters = recipes.recipe(task, method).resolve(requested, rows)
            # A service limit, not a training knob: resolved and shown with the rest, enforced by the worker.
            hyperparameters["max_runtime_seconds"] = max_runtime
        except DataError as exc:
            message = recipes.problems_message(exc.problems)
            if which == "validation_file":
                message = f"validation file: {message}"
            jobs.transition(session, job, jobs.FAILED, f"Invalid training file: {message}", level="error",
                            error=jobs.failure("invalid_training_file", message, which))
            return True
        except FileNotFoundError as exc:
            jobs.transition(session, job, jobs.FAILED, f"File {exc} is gone", level="error",
                            error=jobs.failure("invalid_training_file", f"file {exc} was deleted",
                                               "training_file"))
            return True
        except Exception as exc:
            if unreachable(exc):
                raise  # Postgres, not the file: the reconciler sends validation again once it is back
            if which == "hyperparameters" and isinstance(exc, ValueError):
                jobs.transition(session, job, jobs.FAILED, f"Invalid hyperparameters: {exc}", level="error",
                                error=jobs.failure("invalid_hyperparameters", str(exc), "hyperparameters"))
                return True
            # Whatever else reading the file raised, the file is at fault and the job ends here: an
            # exception escaping would roll back and leave the job to be validated again, forever.
            log.exception("validate %s: reading %s failed", job_id, which)
            message = f"the {which.replace('_', ' ')} could not be read ({type(exc).__name__})"
            jobs.transition(session, job, jobs.FAILED, f"Invalid training file: {message}", level="error",
                            error=jobs.failure("invalid_training_file", message, which))
            return True
        job.task = task
        job.hyperparameters = hyperparameters
        jobs.add_job_event(session, job, f"Files validated: {rows} training examples, task {task}")
        jobs.transition(session, job, jobs.QUEUED, "Job queued for training")
        jobs.offer_to_workers(session, job)
        jobs.note_if_too_wide(session, job)
    return True


@celery_app.task(name=dispatch.TASK_TRAIN, bind=True)
def train_job(self: Task, offered_by: str | None = None) -> None:
    """A ticket (`jobs.offer_to_workers`): claim the job the scheduler picks now, train it with progress,
    checkpoints and cooperative stop, and record the outcome.

    ``offered_by`` is the job whose queueing sent this ticket, for the log; the job trained may be another.
    """
    settings = get_settings()
    worker = worker_name(self)
    capacity = worker_capacity()
    with transaction() as session:
        job = jobs_repo.claim_next(session, worker, fair=jobs.fair(), capacity=capacity)
        if job is None:
            wider = jobs_repo.narrowest_wider_than(session, capacity)
            if wider is None:
                log.info("train: nothing queued (ticket of %s; its job was already picked by another ticket)",
                         offered_by)
                return
            # Jobs wider than this worker wait, and this ticket may have been theirs (a wider worker took the
            # narrow job it was sent for): pass it on to the workers that can hold them. Tickets only move to
            # wider queues, so none circles.
            log.info("train: queued jobs need %s processes, this worker offers %s; ticket passed on", wider,
                     capacity)
            dispatch.enqueue_after_commit(session, dispatch.TASK_TRAIN, offered_by,
                                          queue=dispatch.training_queue(wider))
            return
        job_id = job.id
        from db.models import Tenant

        tenant = session.get(Tenant, job.tenant_id)
        assert tenant is not None
        base = session.get(Model, job.model)
        if base is None:
            jobs.transition(session, job, jobs.FAILED, f"Base model {job.model} is gone", level="error",
                            error=jobs.failure("model_not_found", f"model {job.model} was deleted", "model"))
            jobs_repo.release_claim(session, job.id, job.attempts, "failed")
            return
        model_name = fine_tuned_model_id(job, base, tenant.name)
        # Downloaded (when in object storage) by `_run_training`, not while the claim's transaction is open.
        train_location = _file_location(session, job, job.training_file)
        valid_location = _file_location(session, job, job.validation_file)
        attempt = job.attempts
        # A fine-tuned base (continued training) may be in the bucket: materialized by `_run_training`.
        base_location = base.path
        runtime_limit = float((job.hyperparameters or {}).get("max_runtime_seconds")
                              or settings.max_job_runtime_seconds)
        runtime_left = runtime_limit - jobs_repo.runtime_used(session, job.id)
        if runtime_left <= 0:
            # Earlier attempts (ended by crashes) used the whole budget: no point in starting again.
            jobs.fail_over_runtime(session, job, attempt, runtime_limit, (job.progress or {}).get("step"))
            return
        # Which host runs it is for operators (logs, Flower), not for clients.
        jobs.add_job_event(session, job, f"Training started (attempt {attempt})")
        log.info("train %s: attempt %s on %s", job_id, attempt, worker)
        emit_event(session, job.tenant_id, jobs.EVENT_TYPES[jobs.RUNNING], jobs.job_object(job))
        snapshot = {"task": job.task, "hyperparameters": job.hyperparameters, "seed": job.seed,
                    "processes": job.processes}
        tracked = [dict(entry) for entry in job.integrations or []]
        tracked_params = {**(job.hyperparameters or {}), "base_model": job.model, "task": job.task,
                          "seed": job.seed, "processes": job.processes}

    reporter = JobReporter(job_id, attempt, model_name, heartbeat_seconds=settings.heartbeat_seconds,
                           progress_event_seconds=settings.progress_event_seconds, runtime_left=runtime_left)
    reporter.on_hard_limit = lambda: _end_runaway_attempt(job_id, attempt, runtime_limit)
    reporter.start()
    reporter.trackers = start_trackers(job_id, tracked, tracked_params)
    model_dir: Path | None = None
    # SIGTERM (a deploy, `llmos up` stopping) checkpoints at the next step and hands the job back, instead of
    # killing the process mid-step and waiting for the reconciler to notice. The handler stays until the
    # outcome is recorded: a second SIGTERM after training (a supervisor's, or the worker's own shutdown
    # arriving late) must not kill the process between the last step and the record of what it produced.
    previous = signal.signal(signal.SIGTERM, lambda *_: reporter.shutdown_requested.set())
    try:
        try:
            result = _run_training(job_id, base_location, train_location, valid_location, snapshot, reporter)
        except Exception as exc:
            if unreachable(exc):
                # Not the job's fault: stop this attempt; its heartbeat goes silent and the reconciler requeues
                # it once Postgres is back, resuming from the checkpoint on disk.
                log.error("train %s: database unreachable for too long; leaving the job to the reconciler",
                          job_id)
                return
            killed = _killed_rank(exc)
            if killed is not None:
                # A rank killed from outside (the OOM killer, an operator) is a lost worker, not a bug in the
                # job: it resumes from its last checkpoint, counted against `max_attempts` like any lost worker.
                log.error("train %s: %s", job_id, killed)
                when_reachable(lambda: _lose_attempt(job_id, attempt, str(killed)), f"loss of {job_id}",
                               OUTAGE_WAIT_SECONDS)
                return
            log.exception("training of %s failed", job_id)
            message = f"{type(exc).__name__}: {exc}"
            when_reachable(lambda: _finish_failed(job_id, attempt, message), f"failure of {job_id}",
                           OUTAGE_WAIT_SECONDS)
            return
        finally:
            reporter.close()
        if reporter.lost:
            log.warning("train %s: attempt %s lost its claim; leaving the job to the newer attempt", job_id,
                        attempt)
            return
        # A trained model is not thrown away because Postgres restarted at the wrong moment.
        when_reachable(lambda: _record_outcome(job_id, attempt, model_name, base, result), f"outcome of {job_id}",
                       OUTAGE_WAIT_SECONDS)
        if result.outcome.completed:
            model_dir = Path(result.model_dir)
    finally:
        signal.signal(signal.SIGTERM, previous)
        end_trackers(job_id, reporter.trackers, model_dir)
        if model_dir is not None and storage.remote():
            # This machine's working copy: the model, results and checkpoints are all in the bucket now.
            shutil.rmtree(job_dir(job_id), ignore_errors=True)


def _run_training(job_id: str, base_location: str, train_location: str | None, valid_location: str | None,
                  snapshot: dict[str, Any], reporter: JobReporter) -> Any:
    from training.devices import configure_cpu
    from training.trainer import checkpoint_step, latest_checkpoint

    configure_cpu(get_settings().torch_threads)
    train_path, valid_path = _local(train_location), _local(valid_location)
    base_path = storage.materialize(base_location)
    assert train_path is not None
    task = snapshot["task"]
    method = method_of(snapshot["hyperparameters"])
    _, train_rows = recipes.load_rows(train_path, task, [task], method)
    eval_rows = recipes.load_rows(valid_path, task, [task], method)[1] if valid_path else None
    root = job_dir(job_id)
    checkpoint_dir = root / "checkpoints"
    # Another machine may have trained this job before: its last uploaded checkpoint comes down first.
    storage.restore_checkpoint(job_id, checkpoint_dir, checkpoint_step)
    resume_from = latest_checkpoint(checkpoint_dir)
    if resume_from is not None:
        step = int(resume_from.name.rsplit("-", 1)[-1])
        with transaction() as session:
            job = jobs_repo.get_job_by_id(session, job_id)
            assert job is not None
            jobs.add_job_event(session, job, f"resumed from checkpoint at step {step}")
    steps = recipes.recipe(task, method)
    training_hyperparameters = {k: v for k, v in snapshot["hyperparameters"].items() if k != "max_runtime_seconds"}
    spec = steps.spec(
        base_model_dir=base_path, output_dir=root / "model", checkpoint_dir=checkpoint_dir,
        train_rows=train_rows, eval_rows=eval_rows, hyperparameters=training_hyperparameters,
        seed=snapshot["seed"], eval_fraction=get_settings().eval_fraction,
    )
    processes = int(snapshot.get("processes") or 1)
    if processes == 1:
        return steps.train(spec, reporter, resume_from=resume_from)
    from training.distributed import run_distributed

    with transaction() as session:
        job = jobs_repo.get_job_by_id(session, job_id)
        assert job is not None
        jobs.add_job_event(session, job, f"Training with {processes} processes")
    return run_distributed(steps.train, spec, processes, reporter, resume_from=resume_from)


def _killed_rank(exc: BaseException) -> BaseException | None:
    """The `RankFailed` behind ``exc`` when a training rank was ended by a signal; None otherwise."""
    from training.distributed import RankFailed

    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, RankFailed) and candidate.exitcode < 0:
            return candidate
    return None


def _lose_attempt(job_id: str, attempt: int, message: str) -> None:
    with transaction() as session:
        job = jobs_repo.get_job_by_id(session, job_id, lock=True)
        if job is not None and jobs.holds_claim(job, attempt):
            message = jobs.scrub(message)
            jobs.lose_attempt(session, job, message[:1].upper() + message[1:])


def _end_runaway_attempt(job_id: str, attempt: int, limit: float) -> None:
    """Hard limit: the step did not return within the grace, so fail the job and end this process."""
    with transaction() as session:
        jobs.end_runaway_attempt(session, job_id=job_id, attempt=attempt, limit=limit)
    log.error("train %s: still running past its hard runtime limit; ending the process", job_id)
    # The pool replaces this process (one task per child); the stuck step cannot be interrupted otherwise.
    os.kill(os.getpid(), signal.SIGKILL)


def _finish_failed(job_id: str, attempt: int, message: str) -> None:
    with transaction() as session:
        jobs.fail_attempt(session, job_id=job_id, attempt=attempt, message=message)


def _refer_to_base(model_dir: Path, base_location: str) -> None:
    """A LoRA model names its base by a local path (its manifest); when the base is a fine-tuned model in the
    bucket, that path is this machine's cached copy, so the base's location goes with the model too."""
    from training.lora import ADAPTER_MANIFEST, is_adapter_dir

    if storage.is_stored_remotely(base_location) and is_adapter_dir(model_dir):
        storage.note_reference(model_dir, ADAPTER_MANIFEST, "base_model_dir", base_location)


def _record_outcome(job_id: str, attempt: int, model_name: str, base: Model, result: Any) -> None:
    """Write what training produced beside the job, then record the outcome through the jobs service."""
    from training.classification import write_results_csv

    outcome = result.outcome
    if not outcome.completed:
        with transaction() as session:
            cancelled = jobs.stop_attempt(session, job_id=job_id, attempt=attempt, reason=outcome.stop_reason,
                                          step=outcome.global_step)
        if cancelled:
            shutil.rmtree(job_dir(job_id) / "checkpoints", ignore_errors=True)
            storage.delete_key(f"{storage.job_key(job_id)}/checkpoints")
        return
    results_path = job_dir(job_id) / "results.csv"
    write_results_csv(outcome.history, getattr(result, "report", {}), results_path)
    results_bytes = results_path.stat().st_size
    # With object storage, the model and results are uploaded before the job is recorded as succeeded, so
    # every machine can serve and download them from then on.
    _refer_to_base(Path(result.model_dir), base.path)
    model_location = storage.publish(Path(result.model_dir), f"{storage.job_key(job_id)}/model")
    results_location = storage.publish(results_path, f"{storage.job_key(job_id)}/results.csv")
    with transaction() as session:
        jobs.record_success(session, job_id=job_id, attempt=attempt, model_name=model_name, base=base,
                            model_dir=model_location, metrics=result.metrics,
                            trained_tokens=outcome.trained_tokens, step=outcome.global_step,
                            results_location=results_location, results_bytes=results_bytes)
