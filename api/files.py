"""Files: upload, list, get, content, delete."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Form, Request, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import Principal, get_session, require
from api.errors import APIError, conflict, not_found
from api.pages import After, Limit, page_body
from db import files as files_repo
from db.models import Batch, File, FineTuningJob
from domain import batches, ids
from domain.clock import unix, utcnow
from domain.jobs import TERMINAL
from domain.settings import get_settings
from domain.storage import NotUtf8, TooLarge, file_path, store_upload

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSES = ("fine-tune", "batch", "fine-tune-results", "batch_output")
CHUNK = 1024 * 1024


def file_object(row: File) -> dict[str, Any]:
    return {
        "id": row.id, "object": "file", "bytes": row.bytes, "created_at": unix(row.created_at),
        "filename": row.filename, "purpose": row.purpose, "status": "processed",
        "status_details": None, "expires_at": None,
    }


def _chunks(upload: UploadFile) -> Iterator[bytes]:
    while chunk := upload.file.read(CHUNK):
        yield chunk


@router.post("", summary="Upload a file")
def upload_file(
    request: Request,
    file: UploadFile,
    purpose: Literal["fine-tune", "batch"] = Form(..., description="fine-tune or batch"),
    principal: Principal = Depends(require("files")),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    settings = get_settings()
    file_id = ids.new_id(ids.FILE)
    dest = file_path(principal.tenant_id, file_id)
    try:
        size, digest = store_upload(_chunks(file), dest, settings.max_upload_bytes)
    except TooLarge as exc:
        raise APIError(413, str(exc), param="file", code="file_too_large") from None
    except NotUtf8 as exc:
        raise APIError(400, f"file is not UTF-8 text: {exc}", param="file", code="invalid_encoding") from None
    if size == 0:
        dest.unlink(missing_ok=True)
        raise APIError(400, "file is empty", param="file", code="empty_file")
    row = File(id=file_id, tenant_id=principal.tenant_id, filename=(file.filename or "upload")[:512],
               purpose=purpose, bytes=size, sha256=digest, path=str(dest))
    session.add(row)
    try:
        session.commit()
    except Exception:
        dest.unlink(missing_ok=True)
        raise
    return file_object(row)


@router.get("", summary="List files")
def list_files(
    purpose: str | None = None,
    limit: int = Limit,
    after: str | None = After,
    principal: Principal = Depends(require("files")),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    page = files_repo.list_files(session, principal.tenant_id, purpose, after, limit)
    return page_body(page, file_object, after)


def _get(session: Session, principal: Principal, file_id: str) -> File:
    row = files_repo.get_file(session, principal.tenant_id, file_id)
    if row is None:
        raise not_found("file", file_id)
    return row


@router.get("/{file_id}", summary="Retrieve a file")
def get_file(
    file_id: str, principal: Principal = Depends(require("files")), session: Session = Depends(get_session)
) -> dict[str, Any]:
    return file_object(_get(session, principal, file_id))


@router.get("/{file_id}/content", summary="Download a file's content", response_class=FileResponse)
def file_content(
    file_id: str, principal: Principal = Depends(require("files")), session: Session = Depends(get_session)
) -> FileResponse:
    row = _get(session, principal, file_id)
    return FileResponse(row.path, filename=row.filename, media_type="application/octet-stream")


@router.delete("/{file_id}", summary="Delete a file")
def delete_file(
    file_id: str, principal: Principal = Depends(require("files")), session: Session = Depends(get_session)
) -> dict[str, Any]:
    row = _get(session, principal, file_id)
    in_use = session.scalar(
        select(FineTuningJob.id).where(
            FineTuningJob.tenant_id == principal.tenant_id,
            FineTuningJob.status.not_in(TERMINAL),
            (FineTuningJob.training_file == file_id) | (FineTuningJob.validation_file == file_id),
        ).limit(1)
    )
    if in_use:
        raise conflict(f"file {file_id} is used by job {in_use}, which has not finished", code="file_in_use")
    batch = session.scalar(
        select(Batch.id).where(
            Batch.tenant_id == principal.tenant_id, Batch.input_file_id == file_id,
            Batch.status.in_(batches.ACTIVE),
        ).limit(1)
    )
    if batch:
        raise conflict(f"file {file_id} is the input of batch {batch}, which has not finished", code="file_in_use")
    row.deleted_at = utcnow()
    session.commit()
    file_path(principal.tenant_id, file_id).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
