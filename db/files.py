"""Uploaded files."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Batch, File, FineTuningJob
from db.pagination import Page, newest_first


def get_file(session: Session, tenant_id: str, file_id: str) -> File | None:
    """A tenant's live file; another tenant's ID finds nothing, exactly like an unknown one."""
    return session.scalar(
        select(File).where(File.id == file_id, File.tenant_id == tenant_id, File.deleted_at.is_(None))
    )


def list_files(
    session: Session, tenant_id: str, purpose: str | None, after: str | None, limit: int
) -> Page[File] | None:
    stmt = select(File).where(File.tenant_id == tenant_id, File.deleted_at.is_(None))
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    return newest_first(session, stmt, File.created_at, File.id, File.id, after, limit)


def unfinished_job_using(session: Session, tenant_id: str, file_id: str, terminal: frozenset[str]) -> str | None:
    """A job of the tenant, not yet in a ``terminal`` status, that trains or validates on the file."""
    return session.scalar(
        select(FineTuningJob.id).where(
            FineTuningJob.tenant_id == tenant_id, FineTuningJob.status.not_in(terminal),
            (FineTuningJob.training_file == file_id) | (FineTuningJob.validation_file == file_id),
        ).limit(1)
    )


def active_batch_reading(session: Session, tenant_id: str, file_id: str, active: frozenset[str]) -> str | None:
    """A batch of the tenant, in an ``active`` status, whose input is the file."""
    return session.scalar(
        select(Batch.id).where(Batch.tenant_id == tenant_id, Batch.input_file_id == file_id,
                               Batch.status.in_(active)).limit(1)
    )
