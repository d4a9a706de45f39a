"""Batches and their chunks."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.clock import utcnow
from db.models import Batch, BatchChunk
from db.pagination import Page, newest_first


def get_batch(session: Session, tenant_id: str, batch_id: str, *, lock: bool = False) -> Batch | None:
    """A tenant's batch; another tenant's ID finds nothing, exactly like an unknown one."""
    stmt = select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
    if lock:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


def get_batch_by_id(session: Session, batch_id: str, *, lock: bool = False) -> Batch | None:
    """Unscoped lookup for workers, which act on IDs they were sent."""
    stmt = select(Batch).where(Batch.id == batch_id)
    if lock:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


def list_batches(session: Session, tenant_id: str, after: str | None, limit: int) -> Page[Batch] | None:
    stmt = select(Batch).where(Batch.tenant_id == tenant_id)
    return newest_first(session, stmt, Batch.created_at, Batch.id, Batch.id, after, limit)


def chunks(session: Session, batch_id: str) -> list[BatchChunk]:
    """A batch's chunks in input order."""
    return list(session.scalars(select(BatchChunk).where(BatchChunk.batch_id == batch_id).order_by(BatchChunk.seq)))


def next_chunk(session: Session, batch_id: str) -> BatchChunk | None:
    """The first chunk not done yet (chunks run one after another, in order)."""
    return session.scalar(
        select(BatchChunk).where(BatchChunk.batch_id == batch_id, BatchChunk.status != "done")
        .order_by(BatchChunk.seq).limit(1)
    )


def claim_chunk(session: Session, batch_id: str, seq: int, task_id: str, worker: str) -> BatchChunk | None:
    """Atomically move a pending chunk sent under ``task_id`` to running; a stale or duplicate send finds none."""
    return session.scalar(
        update(BatchChunk)
        .where(BatchChunk.batch_id == batch_id, BatchChunk.seq == seq, BatchChunk.status == "pending",
               BatchChunk.task_id == task_id)
        .values(status="running", attempts=BatchChunk.attempts + 1, worker=worker, started_at=utcnow())
        .returning(BatchChunk)
        .execution_options(synchronize_session=False)
    )


def heartbeat(session: Session, batch_id: str) -> tuple[str, str | None] | None:
    """Record that a worker holds the batch; returns (status, stop_reason), or None when it is gone."""
    row = session.execute(
        update(Batch).where(Batch.id == batch_id).values(heartbeat_at=utcnow())
        .returning(Batch.status, Batch.stop_reason)
    ).first()
    return None if row is None else (str(row[0]), row[1])


def stale_batches(session: Session, statuses: tuple[str, ...], older_than: datetime) -> list[Batch]:
    """Unfinished batches nobody has touched since ``older_than``, locked, skipping ones in use."""
    return list(session.scalars(
        select(Batch).where(Batch.status.in_(statuses), Batch.heartbeat_at < older_than)
        .with_for_update(skip_locked=True)
    ))


def overdue_batches(session: Session, statuses: tuple[str, ...], now: datetime) -> list[Batch]:
    """Batches past ``expires_at`` that have not been told to stop yet, locked."""
    return list(session.scalars(
        select(Batch).where(Batch.status.in_(statuses), Batch.expires_at < now, Batch.stop_reason.is_(None))
        .with_for_update(skip_locked=True)
    ))
