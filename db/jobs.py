"""Fine-tuning jobs, their events, checkpoints and claims."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, bindparam, delete, func, select, text, update
from sqlalchemy.orm import Session

from core.clock import utcnow
from db.models import Checkpoint, FineTuningJob, JobClaim, JobEvent, TrainingWorker
from db.pagination import Page, newest_first


def get_job(session: Session, tenant_id: str, job_id: str, *, lock: bool = False) -> FineTuningJob | None:
    stmt = select(FineTuningJob).where(FineTuningJob.id == job_id, FineTuningJob.tenant_id == tenant_id)
    if lock:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


# The columns of the public job object, as plain columns: a poll is read without ORM entity loading (the
# API's most frequent request; each row attribute is named as the model's, so `job_object` reads either).
PUBLIC_COLUMNS = tuple(getattr(FineTuningJob, name).label(name) for name in (
    "id", "tenant_id", "model", "status", "task", "training_file", "validation_file", "hyperparameters",
    "fine_tuned_model", "finished_at", "estimated_finish", "error", "result_files", "trained_tokens", "seed",
    "job_metadata", "suffix", "progress", "metrics", "attempts", "webhook_url", "priority", "processes",
    "integrations", "created_at"))
_PUBLIC_JOB = select(*PUBLIC_COLUMNS).where(FineTuningJob.id == bindparam("job_id"),
                                            FineTuningJob.tenant_id == bindparam("tenant_id"))


def public_job(conn: Connection, tenant_id: str, job_id: str) -> Row[Any] | None:
    """The tenant's job, only the columns of its public object: one statement, no ORM."""
    return conn.execute(_PUBLIC_JOB, {"job_id": job_id, "tenant_id": tenant_id}).first()


def get_job_by_id(session: Session, job_id: str, *, lock: bool = False) -> FineTuningJob | None:
    """Unscoped lookup for workers, which act on IDs they were sent."""
    stmt = select(FineTuningJob).where(FineTuningJob.id == job_id)
    if lock:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


def list_jobs(
    session: Session,
    tenant_id: str,
    *,
    status: str | None,
    metadata: dict[str, str],
    after: str | None,
    limit: int,
) -> Page[FineTuningJob] | None:
    stmt = select(FineTuningJob).where(FineTuningJob.tenant_id == tenant_id)
    if status:
        stmt = stmt.where(FineTuningJob.status == status)
    if metadata:
        stmt = stmt.where(FineTuningJob.job_metadata.contains(metadata))
    return newest_first(
        session, stmt, FineTuningJob.created_at, FineTuningJob.id, FineTuningJob.id, after, limit
    )


def list_events(session: Session, job_id: str, after: str | None, limit: int) -> Page[JobEvent] | None:
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    return newest_first(session, stmt, JobEvent.seq, JobEvent.seq, JobEvent.id, after, limit)


def events_since(session: Session, job_id: str, after_seq: int, limit: int = 500) -> list[JobEvent]:
    """A job's events after ``after_seq``, oldest first (for live streams)."""
    return list(session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq).order_by(JobEvent.seq).limit(limit)
    ))


def status_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(FineTuningJob.status).where(FineTuningJob.id == job_id))


def checkpoint_at(session: Session, job_id: str, step: int) -> Checkpoint | None:
    return session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step_number == step))


def list_checkpoints(
    session: Session, job_id: str, after: str | None, limit: int
) -> Page[Checkpoint] | None:
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id)
    return newest_first(
        session, stmt, Checkpoint.step_number, Checkpoint.id, Checkpoint.id, after, limit
    )


# --------------------------------------------------------------------------------------------------------
# Admission: which queued job a free training worker runs next.
#
# Fair order: the tenant with the fewest running jobs per unit of weight goes first; among equals, the
# tenant served least recently (whose last job started longest ago; never served comes first), so one
# worker alternates between tenants instead of draining the tenant that queued first. Within a tenant,
# higher priority first, then oldest. The same order, extended as if each pick started at once (a tenant's
# k-th waiting job counts k more running), gives every waiting job its `queue_position`. A worker picks among
# the jobs it can hold (`processes` no more than it offers), so a wide job at the head does not idle the
# narrow workers; positions count every waiting job.
# --------------------------------------------------------------------------------------------------------

_FAIR_ORDER = """
WITH waiting AS (
    SELECT j.id, j.tenant_id,
           row_number() OVER (PARTITION BY j.tenant_id ORDER BY j.priority DESC, j.created_at, j.id) - 1 AS k
    FROM fine_tuning_jobs j WHERE j.status = 'queued' AND j.processes <= :capacity
), shares AS (
    SELECT t.id AS tenant_id, COALESCE(t.weight, 1.0) AS weight,
           (SELECT count(*) FROM fine_tuning_jobs r
            WHERE r.tenant_id = t.id AND r.status IN ('running', 'cancelling')) AS running,
           (SELECT max(s.started_at) FROM fine_tuning_jobs s WHERE s.tenant_id = t.id) AS last_started,
           (SELECT min(COALESCE(q.queued_at, q.created_at)) FROM fine_tuning_jobs q
            WHERE q.tenant_id = t.id AND q.status = 'queued') AS oldest
    FROM tenants t WHERE t.id IN (SELECT tenant_id FROM waiting)
)
SELECT w.id, w.tenant_id,
       row_number() OVER (ORDER BY (s.running + w.k) / s.weight, s.last_started NULLS FIRST, s.oldest,
                                   w.tenant_id, w.k) AS position
FROM waiting w JOIN shares s USING (tenant_id)
"""

_FIFO_ORDER = """
SELECT j.id, j.tenant_id, row_number() OVER (ORDER BY COALESCE(j.queued_at, j.created_at), j.id) AS position
FROM fine_tuning_jobs j WHERE j.status = 'queued' AND j.processes <= :capacity
"""

# One scheduler decision at a time: two workers freed at once must not both pick by the same counts.
_SCHEDULER_LOCK = 0x6C6C6D6F73  # "llmos"


def _order(fair: bool) -> str:
    return _FAIR_ORDER if fair else _FIFO_ORDER


_ANY_WIDTH = 2**31 - 1


def next_queued(session: Session, *, fair: bool, capacity: int = _ANY_WIDTH) -> str | None:
    """The job the scheduler would start now on a worker offering ``capacity`` ranks."""
    return session.scalar(text(f"SELECT id FROM ({_order(fair)}) o ORDER BY position LIMIT 1"),
                          {"capacity": capacity})


def queue_positions(conn: Connection | Session, tenant_id: str, *, fair: bool) -> dict[str, int]:
    """The 1-based place of each of the tenant's queued jobs among every tenant's waiting jobs."""
    rows = conn.execute(text(f"SELECT id, position FROM ({_order(fair)}) o WHERE tenant_id = :tenant_id"),
                        {"tenant_id": tenant_id, "capacity": _ANY_WIDTH}).all()
    return {str(row[0]): int(row[1]) for row in rows}


def claim_next(session: Session, worker: str, *, fair: bool, capacity: int = 1) -> FineTuningJob | None:
    """Pick the next job that fits ``capacity`` ranks by the scheduler's order and claim it; None when nothing
    that fits is queued.

    The decision holds a transaction-scoped advisory lock until the caller commits, so concurrent workers
    decide one after the other, each seeing the claims before it. A pick that a concurrent pause or cancel
    took first is skipped for the next one.
    """
    session.execute(select(func.pg_advisory_xact_lock(_SCHEDULER_LOCK)))
    for _ in range(5):
        job_id = next_queued(session, fair=fair, capacity=capacity)
        if job_id is None:
            return None
        job = claim_job(session, job_id, worker)
        if job is not None:
            return job
    return None


# Validation takes tenants in turn as well: the next job comes from the tenant whose last validation started
# longest ago (never validated comes first), then by priority and age within the tenant; so one tenant's
# hundred uploads cannot hold another tenant's job in validation behind them. A claim stamps
# `validation_started_at` before the work, so a tenant whose job is being validated has just been served,
# whatever the number of workers. A job a worker is validating holds its row lock and is skipped; one whose
# validation has been started ``max_attempts`` times without finishing is left for the reconciler to fail.
# A claim is committed before the work and the row locked just after it: for that moment a short lease holds
# the job instead, so a concurrent claim cannot take it too (database time on both sides, whatever the
# workers' clocks say).
VALIDATION_LEASE_SECONDS = 5
_DB_NOW = "(now() AT TIME ZONE 'utc')"
_CLAIMABLE = ("j.status = 'validating_files' AND j.validation_attempts < :max_attempts AND "
              "(j.validation_started_at IS NULL OR "
              f"j.validation_started_at < {_DB_NOW} - make_interval(secs => :lease))")

_FAIR_VALIDATION_ORDER = f"""
WITH waiting AS (
    SELECT j.id, j.tenant_id, j.created_at,
           row_number() OVER (PARTITION BY j.tenant_id ORDER BY j.priority DESC, j.created_at, j.id) AS k
    FROM fine_tuning_jobs j WHERE {_CLAIMABLE}
), served AS (
    SELECT t.tenant_id, (SELECT max(s.validation_started_at) FROM fine_tuning_jobs s
                         WHERE s.tenant_id = t.tenant_id) AS last_started
    FROM (SELECT DISTINCT tenant_id FROM waiting) t
)
SELECT w.id FROM waiting w JOIN served USING (tenant_id)
ORDER BY served.last_started NULLS FIRST, w.tenant_id, w.k LIMIT :candidates
"""

_FIFO_VALIDATION_ORDER = f"""
SELECT j.id FROM fine_tuning_jobs j WHERE {_CLAIMABLE} ORDER BY j.created_at, j.id LIMIT :candidates
"""

_CLAIM_VALIDATION = text(f"""
UPDATE fine_tuning_jobs SET validation_attempts = validation_attempts + 1, validation_started_at = {_DB_NOW},
                            updated_at = {_DB_NOW}
WHERE id = (SELECT j.id FROM fine_tuning_jobs j WHERE j.id = :job_id AND {_CLAIMABLE} FOR UPDATE SKIP LOCKED)
RETURNING id
""")


def claim_next_validation(session: Session, *, fair: bool, max_attempts: int, candidates: int = 16) -> str | None:
    """Take the next job to validate in the scheduler's order and count the attempt; None when none is free.

    The caller commits at once, before the work, so that a validation that kills its worker (a file that
    exhausts memory, say) is still counted; it then locks the row for the work itself and checks that the job
    still waits for validation. Between the two, the claim's lease keeps other workers off the job.
    """
    params = {"max_attempts": max_attempts, "lease": VALIDATION_LEASE_SECONDS}
    query = _FAIR_VALIDATION_ORDER if fair else _FIFO_VALIDATION_ORDER
    for job_id in session.scalars(text(query), {**params, "candidates": candidates}).all():
        picked = session.scalar(_CLAIM_VALIDATION, {**params, "job_id": job_id})
        if picked is not None:
            return str(picked)
    return None


def unclaimed_validation_count(session: Session) -> int:
    """How many jobs wait for validation with no worker validating them (a worker holds its job's row lock).

    Counted by taking the row locks that are free inside a savepoint rolled back at once: validators' claims
    skip locked rows, so holding these for the caller's whole transaction would send tickets away empty.
    """
    with session.begin_nested() as nested:
        count = session.scalar(text(
            "SELECT count(*) FROM (SELECT 1 FROM fine_tuning_jobs WHERE status = 'validating_files' "
            "FOR KEY SHARE SKIP LOCKED) s"))
        nested.rollback()
    return int(count or 0)


def narrowest_wider_than(session: Session, capacity: int) -> int | None:
    """The fewest ranks any queued job asks for beyond ``capacity``; None when every queued job fits."""
    return session.scalar(select(func.min(FineTuningJob.processes))
                          .where(FineTuningJob.status == "queued", FineTuningJob.processes > capacity))


def queued_widths(session: Session) -> list[int]:
    """The distinct `processes` of the queued jobs (which training queues hold their tickets)."""
    return list(session.scalars(select(FineTuningJob.processes).where(FineTuningJob.status == "queued")
                                .distinct()))


# --- what the live training workers offer ----------------------------------------------------------------

def advertise_worker(session: Session, name: str, processes: int) -> None:
    """Record (or refresh) a training worker and the ranks it offers."""
    from sqlalchemy.dialects.postgresql import insert

    now = utcnow()
    session.execute(insert(TrainingWorker).values(name=name, processes=processes, seen_at=now)
                    .on_conflict_do_update(index_elements=[TrainingWorker.name],
                                           set_={"processes": processes, "seen_at": now}))


def forget_worker(session: Session, name: str) -> None:
    session.execute(delete(TrainingWorker).where(TrainingWorker.name == name))


def largest_offer(session: Session, seen_since: datetime) -> int | None:
    """The most ranks a training worker seen since ``seen_since`` offers; None when none was seen."""
    return session.scalar(select(func.max(TrainingWorker.processes)).where(TrainingWorker.seen_at >= seen_since))


def count_status(session: Session, status: str) -> int:
    return int(session.scalar(select(func.count()).select_from(FineTuningJob)
                              .where(FineTuningJob.status == status)) or 0)


def claim_job(session: Session, job_id: str, worker: str) -> FineTuningJob | None:
    """Atomically move a queued job to running; a duplicate delivery finds nothing to claim."""
    now = utcnow()
    job = session.scalar(
        update(FineTuningJob)
        .where(FineTuningJob.id == job_id, FineTuningJob.status == "queued")
        .values(
            status="running", attempts=FineTuningJob.attempts + 1, worker=worker, heartbeat_at=now,
            updated_at=now, started_at=now, pause_requested=False,
        )
        .returning(FineTuningJob)
        .execution_options(synchronize_session=False)
    )
    if job is not None:
        session.add(JobClaim(job_id=job.id, attempt=job.attempts, worker=worker, claimed_at=now))
    return job


def release_claim(session: Session, job_id: str, attempt: int, outcome: str) -> None:
    session.execute(
        update(JobClaim)
        .where(JobClaim.job_id == job_id, JobClaim.attempt == attempt)
        .values(released_at=utcnow(), outcome=outcome)
    )


def runtime_used(session: Session, job_id: str) -> float:
    """Seconds the job held a worker in its finished attempts (a lost attempt counts until it was noticed)."""
    seconds = session.scalar(
        select(func.coalesce(func.sum(func.extract("epoch", JobClaim.released_at - JobClaim.claimed_at)), 0))
        .where(JobClaim.job_id == job_id, JobClaim.released_at.is_not(None))
    )
    return float(seconds or 0)


def lost_claims(session: Session, job_id: str) -> int:
    """Attempts of the job whose worker stopped responding (pauses and graceful hand-backs are not counted)."""
    return int(session.scalar(
        select(func.count()).select_from(JobClaim).where(JobClaim.job_id == job_id, JobClaim.outcome == "lost")
    ) or 0)


def heartbeat(session: Session, job_id: str, attempt: int) -> tuple[bool, bool, str] | None:
    """Record liveness of this attempt; returns (cancel_requested, pause_requested, status) or None if lost."""
    row = session.execute(
        update(FineTuningJob)
        .where(FineTuningJob.id == job_id, FineTuningJob.attempts == attempt,
               FineTuningJob.status.in_(("running", "cancelling")))
        .values(heartbeat_at=utcnow())
        .returning(FineTuningJob.cancel_requested, FineTuningJob.pause_requested, FineTuningJob.status)
    ).first()
    return None if row is None else (bool(row[0]), bool(row[1]), str(row[2]))


def count_by_status(session: Session) -> dict[str, int]:
    """How many jobs are in each status (for the metrics gauge)."""
    rows = session.execute(select(FineTuningJob.status, func.count()).group_by(FineTuningJob.status)).all()
    return {str(status): int(count) for status, count in rows}


def training_liveness(session: Session) -> tuple[datetime | None, float]:
    """Newest heartbeat of the running training jobs and their summed samples/s, for the metrics.

    One statement over the status index: only running (and cancelling) rows are read.
    """
    row = session.execute(
        select(func.max(FineTuningJob.heartbeat_at),
               func.coalesce(func.sum(FineTuningJob.progress["samples_per_second"].as_float()), 0.0))
        .where(FineTuningJob.status.in_(("running", "cancelling")))
    ).one()
    return row[0], float(row[1])


def database_started_at(session: Session) -> datetime:
    """When the Postgres server last started."""
    started = session.scalar(select(func.pg_postmaster_start_time()))
    assert isinstance(started, datetime)
    return started


def stale_running_jobs(session: Session, older_than: datetime) -> list[FineTuningJob]:
    return list(
        session.scalars(
            select(FineTuningJob)
            .where(FineTuningJob.status.in_(("running", "cancelling")), FineTuningJob.heartbeat_at < older_than)
            .with_for_update(skip_locked=True)
        )
    )


def forgotten_jobs(session: Session, status: str, older_than: datetime) -> list[FineTuningJob]:
    return list(
        session.scalars(
            select(FineTuningJob)
            .where(FineTuningJob.status == status, FineTuningJob.updated_at < older_than)
            .order_by(FineTuningJob.created_at)
            .with_for_update(skip_locked=True)
        )
    )
