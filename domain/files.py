"""The files service: uploads recorded, listed, read and deleted (the bytes live in `domain.storage`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core.clock import unix, utcnow
from core.errors import conflict, not_found
from db import files as files_repo
from db import tenants as tenants_repo
from db.models import File
from domain import batches, quotas, storage
from domain.jobs import TERMINAL
from domain.listing import page


def file_object(row: File) -> dict[str, Any]:
    return {
        "id": row.id, "object": "file", "bytes": row.bytes, "created_at": unix(row.created_at),
        "filename": row.filename, "purpose": row.purpose, "status": "processed",
        "status_details": None, "expires_at": None,
    }


def _file(session: Session, tenant_id: str, file_id: str) -> File:
    row = files_repo.get_file(session, tenant_id, file_id)
    if row is None:
        raise not_found("file", file_id)
    return row


def record_upload(session: Session, *, tenant_id: str, file_id: str, filename: str, purpose: str, size: int,
                  sha256: str) -> dict[str, Any]:
    """The row of a file whose bytes are already stored at `storage.file_location(tenant_id, file_id)`.

    Refused (429) when the tenant's stored bytes would pass `max_storage_bytes`; the caller removes the bytes.
    """
    row = File(id=file_id, tenant_id=tenant_id, filename=filename[:512], purpose=purpose, bytes=size,
               sha256=sha256, path=storage.file_location(tenant_id, file_id))
    session.add(row)
    session.flush()
    quotas.take(session, tenant_id, "max_storage_bytes", lambda _cap: tenants_repo.stored_bytes(session, tenant_id),
                amount=size)
    return file_object(row)


def list_files(session: Session, *, tenant_id: str, purpose: str | None, after: str | None,
               limit: int) -> dict[str, Any]:
    return page(files_repo.list_files(session, tenant_id, purpose, after, limit), file_object, after)


def get_file(session: Session, *, tenant_id: str, file_id: str) -> dict[str, Any]:
    return file_object(_file(session, tenant_id, file_id))


def content_of(session: Session, *, tenant_id: str, file_id: str) -> tuple[str, str]:
    """(location, filename) of the file's bytes (`storage.materialize` gives a local path)."""
    row = _file(session, tenant_id, file_id)
    return row.path, row.filename


def delete_file(session: Session, *, tenant_id: str, file_id: str) -> tuple[dict[str, Any], str]:
    """Mark the file deleted; refused while an unfinished job or batch reads it. Returns the deleted object and
    where its bytes are (uploads, results and batch outputs alike), for the caller to remove after commit."""
    row = _file(session, tenant_id, file_id)
    job = files_repo.unfinished_job_using(session, tenant_id, file_id, TERMINAL)
    if job:
        raise conflict(f"file {file_id} is used by job {job}, which has not finished", code="file_in_use")
    batch = files_repo.active_batch_reading(session, tenant_id, file_id, batches.ACTIVE)
    if batch:
        raise conflict(f"file {file_id} is the input of batch {batch}, which has not finished", code="file_in_use")
    row.deleted_at = utcnow()
    return {"id": file_id, "object": "file", "deleted": True}, row.path
