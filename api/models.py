"""Models: base models from the registry and each tenant's fine-tuned ones."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from api import objects
from api.boundary import read, transaction
from api.deps import Principal, authenticate, require
from api.errors import APIError
from domain import models

router = APIRouter(prefix="/v1/models", tags=["models"])
fine_tuning = require("fine_tuning")


@router.get("", summary="List models", response_model=objects.ListOf[objects.Model])
async def list_models(principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    return await read(models.list_models, tenant_id=principal.tenant_id)


@router.get("/{model_id}", summary="Retrieve a model", response_model=objects.Model)
async def get_model(model_id: str, principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    return await read(models.get_model, tenant_id=principal.tenant_id, model_id=model_id)


def _tar(source: Path, name: str) -> str:
    # Built in a temporary file and removed after sending: a model can be far larger than memory allows.
    with tempfile.NamedTemporaryFile(suffix=".tar", delete=False) as handle, \
            tarfile.open(fileobj=handle, mode="w") as archive:
        archive.add(source, arcname=name)
    return handle.name


@router.get("/{model_id}/content", summary="Download a fine-tuned model as a tar of save_pretrained output (extension)",
            response_class=FileResponse)
async def model_content(model_id: str, principal: Principal = Depends(fine_tuning)) -> FileResponse:
    source = Path(await read(models.files_of, tenant_id=principal.tenant_id, model_id=model_id))
    if not source.is_dir():
        raise APIError(409, f"the files of '{model_id}' are not available on this server", code="model_files_missing")
    name = model_id.replace(":", "_")
    archive = await anyio.to_thread.run_sync(_tar, source, name)
    return FileResponse(archive, filename=name + ".tar", media_type="application/x-tar",
                        background=BackgroundTask(os.unlink, archive))


@router.delete("/{model_id}", summary="Delete a fine-tuned model", response_model=objects.Deleted)
async def delete_model(model_id: str, principal: Principal = Depends(fine_tuning)) -> dict[str, Any]:
    return await transaction(models.delete_model, tenant_id=principal.tenant_id, model_id=model_id)
