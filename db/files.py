"""Uploaded files."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import File
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
