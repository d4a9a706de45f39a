"""Upkeep run by beat: re-send work whose task got lost, requeue jobs whose worker died."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy.orm import Session

from core import ids
from core.clock import utcnow
from core.settings import get_settings
from db import idempotency, inferences
from db import jobs as jobs_repo
from db import webhooks as webhooks_repo
from db.session import relaxed_engine, transaction
from domain import batches, dispatch, jobs, storage
from infra import broker
from tasks.app import celery_app

log = logging.getLogger(__name__)


def _waiting_tickets(widths: list[int]) -> set[str] | None:
    """The training tickets waiting in the broker, across the queues of every width a queued job asks for."""
    found: set[str] = set()
    for queue in {dispatch.training_queue(width) for width in [1, *widths]}:
        ids = broker.waiting_task_ids(queue)
        if ids is None:
            return None
        found |= ids
    return found


def _unticketed_validations(session: Session) -> int | None:
    """Jobs nobody validates beyond the validation tickets waiting in the broker; None when it cannot be read."""
    waiting = broker.waiting_task_ids(dispatch.QUEUE_CPU)
    if waiting is None:
        return None
    tickets = sum(1 for task_id in waiting if task_id.startswith(dispatch.VALIDATION_TICKET_PREFIX))
    return jobs_repo.unclaimed_validation_count(session) - tickets


@celery_app.task(name=dispatch.TASK_RECONCILE)
def reconcile() -> dict[str, int]:
    """One pass of the reconciler; returns counts for the log."""
    settings = get_settings()
    now = utcnow()
    counts = {"resent": 0, "requeued": 0, "failed": 0}
    with transaction() as session:
        forgotten = now - timedelta(seconds=settings.requeue_after_seconds)
        # Validation, like training, runs on tickets: as many must wait as there are jobs nobody is validating.
        # Top up for those waiting a while whose ticket went missing (a publish during a broker outage, a worker
        # that died with its ticket). A job whose validation was started `max_attempts` times and never
        # finished (it kills its worker, say) is failed instead of being tried again forever.
        overdue = jobs_repo.forgotten_jobs(session, jobs.VALIDATING, forgotten)
        # Counted before any is failed below, and only when some job has waited long enough to need it.
        unticketed = _unticketed_validations(session) if overdue else None
        for job in [job for job in overdue if job.validation_attempts >= settings.max_attempts]:
            message = (f"validating the files stopped without finishing {job.validation_attempts} times "
                       "(the worker crashed or was lost); check the file's size and content")
            jobs.transition(session, job, jobs.FAILED, f"Invalid training file: {message}", level="error",
                            error=jobs.failure("invalid_training_file", message, "training_file"))
            counts["failed"] += 1
        overdue = [job for job in overdue if job.validation_attempts < settings.max_attempts]
        missing = len(overdue) if unticketed is None else unticketed - counts["failed"]
        for job in overdue[:max(0, missing)]:
            job.updated_at = now
            jobs.offer_for_validation(session, job)
            counts["resent"] += 1
        # Queued jobs need as many tickets waiting as there are jobs (a ticket runs whichever job is next):
        # top up for those in line a while whose ticket went missing (a publish during a broker outage, a
        # worker that died holding prefetched tickets). An extra ticket is harmless; it finds nothing to do.
        waiting = _waiting_tickets(jobs_repo.queued_widths(session))
        overdue = jobs_repo.forgotten_jobs(session, jobs.QUEUED, forgotten)
        missing = len(overdue) if waiting is None else jobs_repo.count_status(session, jobs.QUEUED) - len(waiting)
        for job in overdue[:max(0, missing)]:
            job.updated_at = now
            jobs.offer_to_workers(session, job)
            counts["resent"] += 1
        stale = now - timedelta(seconds=settings.stale_heartbeat_seconds)
        # Heartbeats could not be written while Postgres was down: right after it restarts, a silent job
        # is not evidence of a dead worker, so wait one stale period for live workers to beat again.
        just_restarted = jobs_repo.database_started_at(session) > stale
        for job in [] if just_restarted else jobs_repo.stale_running_jobs(session, stale):
            log.warning("job %s: worker %s stopped responding", job.id, job.worker)
            status = jobs.lose_attempt(session, job, "The worker stopped responding")
            if status == jobs.QUEUED:
                counts["requeued"] += 1
            elif status == jobs.FAILED:
                counts["failed"] += 1
    with transaction() as session:
        counts["idempotency_keys_purged"] = idempotency.purge_expired(session)
    # Online requests whose worker stopped: their messages are not redelivered, so answer the pollers.
    abandoned = now - timedelta(seconds=settings.inference_abandon_seconds)
    with relaxed_engine().connect() as conn:
        counts["inferences_lost"] = inferences.abandon(conn, abandoned, now, {
            "status": 500, "type": "server_error", "code": "inference_lost",
            "message": f"no worker answered within {settings.inference_abandon_seconds:.0f}s; send the request again"})
    if any(counts.values()):
        log.info("reconcile: %s", counts)
    return counts


@celery_app.task(name=dispatch.TASK_PURGE)
def purge() -> dict[str, int]:
    """Retention (beat, hourly): what is older than `retention_days` goes, in bounded transactions."""
    settings = get_settings()
    counts: dict[str, int] = {}
    if settings.checkpoint_retention_days > 0:
        with transaction() as session:
            aged = jobs.purge_aged_checkpoints(
                session, utcnow() - timedelta(days=settings.checkpoint_retention_days))
        for location in aged:
            storage.delete(location)
        counts["checkpoints"] = len(aged)
    if settings.retention_days <= 0:
        return counts
    before = utcnow() - timedelta(days=settings.retention_days)
    with transaction() as session:
        counts["inferences"] = inferences.purge_finished(session, before)
    with transaction() as session:
        counts["events"] = webhooks_repo.purge_events(session, before)
    if any(counts.values()):
        log.info("purge (older than %s days): %s", settings.retention_days, counts)
    return counts


@celery_app.task(name=batches.TASK_RECONCILE)
def reconcile_batches() -> dict[str, int]:
    """Expire overdue batches and revive ones whose worker went silent; returns counts for the log."""
    from db import batches as batches_repo
    from db.models import Batch
    from tasks.batches import send_settle

    settings = get_settings()
    now = utcnow()
    counts = {"expired": 0, "resent": 0, "settled": 0, "failed": 0}
    with transaction() as session:

        def give_up(batch: Batch, what: str) -> None:
            """Fail a batch whose work keeps dying; settling keeps the lines already answered."""
            batch.stop_reason = "failed"
            message = f"{what}; giving up after {settings.max_attempts} attempts"
            batch.errors = batches.error_list([batches.line_error("worker_lost", message)])
            send_settle(session, batch.id)
            counts["failed"] += 1

        for batch in batches_repo.overdue_batches(session, (batches.VALIDATING, batches.IN_PROGRESS), now):
            # The worker holding it (if any) stops at its next group; settling keeps what was answered.
            batch.stop_reason, batch.updated_at = "expired", now
            send_settle(session, batch.id)
            counts["expired"] += 1
        stale = now - timedelta(seconds=settings.stale_heartbeat_seconds)
        waiting_inference = broker.waiting_task_ids(dispatch.QUEUE_INFERENCE)
        waiting_cpu = broker.waiting_task_ids(dispatch.QUEUE_CPU)
        for batch in batches_repo.stale_batches(session, tuple(batches.ACTIVE), stale):
            if batch.stop_reason is not None or batch.status in (batches.FINALIZING, batches.CANCELLING):
                batch.heartbeat_at = now
                send_settle(session, batch.id)
                counts["settled"] += 1
                continue
            if batch.status == batches.VALIDATING:
                if waiting_cpu is not None and batch.task_id in waiting_cpu:
                    continue  # still in line, not lost
                batch.heartbeat_at = now
                if batch.validation_attempts >= settings.max_attempts:
                    give_up(batch, f"validating the input file stopped without finishing "
                                   f"{batch.validation_attempts} times (a crash or a lost worker)")
                    continue
                dispatch.enqueue_after_commit(session, batches.TASK_VALIDATE, batch.id, task_id=batch.task_id,
                                              queue=dispatch.QUEUE_CPU)
                counts["resent"] += 1
                continue
            chunk = batches_repo.next_chunk(session, batch.id)
            if chunk is None:
                batch.heartbeat_at = now
                send_settle(session, batch.id)
                counts["settled"] += 1
                continue
            if chunk.status == "running":
                # Its worker died mid-chunk (early ack: the message is gone with it); run the chunk again.
                if chunk.attempts >= settings.max_attempts:
                    give_up(batch, f"chunk {chunk.seq} lost its worker {chunk.attempts} times")
                    batch.heartbeat_at = now
                    continue
                log.warning("batch %s: worker %s went silent during chunk %d; sending it again", batch.id,
                            chunk.worker, chunk.seq)
                chunk.status, chunk.task_id = "pending", ids.random_token(32)
            elif waiting_inference is not None and chunk.task_id in waiting_inference:
                continue  # queued behind other work, not lost
            batch.heartbeat_at = now
            # A pending chunk keeps its task id: if the first send turns up after all, the claim dedupes it.
            dispatch.enqueue_after_commit(session, batches.TASK_RUN_CHUNK, batch.id, chunk.seq, chunk.task_id,
                                          task_id=chunk.task_id, queue=dispatch.QUEUE_INFERENCE)
            counts["resent"] += 1
    if any(counts.values()):
        log.info("reconcile batches: %s", counts)
    return counts
