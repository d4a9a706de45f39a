"""Files: upload, list, get, content, delete."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, Form, UploadFile
from fastapi.responses import FileResponse

from api import objects
from api.boundary import read, transaction
from api.deps import Principal, require
from api.errors import APIError
from api.pages import After, Limit
from core import ids
from core.settings import get_settings
from domain import files, storage
from domain.storage import NotUtf8, TooLarge, file_path, store_upload
from infra import objectstore  # noqa: F401  (installs the object store for LLMOS_STORAGE_URL)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/files", tags=["files"])
files_scope = require("files")
CHUNK = 1024 * 1024


def _chunks(upload: UploadFile) -> Iterator[bytes]:
    while chunk := upload.file.read(CHUNK):
        yield chunk


@router.post("", summary="Upload a file", response_model=objects.File)
async def upload_file(
    file: UploadFile,
    purpose: Literal["fine-tune", "batch"] = Form(..., description="fine-tune or batch"),
    principal: Principal = Depends(files_scope),
) -> dict[str, Any]:
    file_id = ids.new_id(ids.FILE)
    dest = file_path(principal.tenant_id, file_id)
    try:
        # Disk writes and the UTF-8 check of up to 512 MiB: on a worker thread, off the event loop.
        size, digest = await anyio.to_thread.run_sync(store_upload, _chunks(file), dest,
                                                      get_settings().max_upload_bytes)
    except TooLarge as exc:
        raise APIError(413, str(exc), param="file", code="file_too_large") from None
    except NotUtf8 as exc:
        raise APIError(400, f"file is not UTF-8 text: {exc}", param="file", code="invalid_encoding") from None
    if size == 0:
        dest.unlink(missing_ok=True)
        raise APIError(400, "file is empty", param="file", code="empty_file")
    try:
        # With object storage, the upload goes to the bucket before its row exists (and the staging copy goes).
        location = await anyio.to_thread.run_sync(storage.publish, dest, storage.file_key(principal.tenant_id,
                                                                                           file_id))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    try:
        return await transaction(files.record_upload, tenant_id=principal.tenant_id, file_id=file_id,
                                 filename=file.filename or "upload", purpose=purpose, size=size, sha256=digest)
    except BaseException:
        await anyio.to_thread.run_sync(storage.delete, location)
        raise


@router.get("", summary="List files", response_model=objects.ListOf[objects.File])
async def list_files(purpose: str | None = None, limit: int = Limit, after: str | None = After,
                     principal: Principal = Depends(files_scope)) -> dict[str, Any]:
    return await read(files.list_files, tenant_id=principal.tenant_id, purpose=purpose, after=after, limit=limit)


@router.get("/{file_id}", summary="Retrieve a file", response_model=objects.File)
async def get_file(file_id: str, principal: Principal = Depends(files_scope)) -> dict[str, Any]:
    return await read(files.get_file, tenant_id=principal.tenant_id, file_id=file_id)


@router.get("/{file_id}/content", summary="Download a file's content", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes"}})
async def file_content(file_id: str, principal: Principal = Depends(files_scope)) -> FileResponse:
    location, filename = await read(files.content_of, tenant_id=principal.tenant_id, file_id=file_id)
    path = await anyio.to_thread.run_sync(storage.materialize, location)
    return FileResponse(path, filename=filename, media_type="application/octet-stream")


@router.delete("/{file_id}", summary="Delete a file", response_model=objects.Deleted)
async def delete_file(file_id: str, principal: Principal = Depends(files_scope)) -> dict[str, Any]:
    deleted, stored_at = await transaction(files.delete_file, tenant_id=principal.tenant_id, file_id=file_id)
    # Where the row says: a job's results and a batch's output live beside the job or batch, not with uploads.
    try:
        await anyio.to_thread.run_sync(storage.delete, stored_at)
    except Exception:
        # The row is deleted and committed: the client's answer stands; the bytes are an operator's to sweep.
        log.exception("file %s: its bytes at %s were not removed", file_id, stored_at)
    return deleted
