"""Models: base models from the registry and each tenant's fine-tuned ones."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from api.deps import Principal, authenticate, get_session
from api.errors import APIError, not_found
from db import registry
from db.models import Model
from domain.clock import unix, utcnow

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_object(row: Model) -> dict[str, Any]:
    return {
        "id": row.id, "object": "model", "created": unix(row.created_at), "owned_by": row.owned_by,
        "kind": row.kind, "tasks": row.tasks, "architecture": row.architecture,
        "base_model": row.base_model, "fine_tuning_job": row.job_id, "description": row.description,
    }


@router.get("", summary="List models")
def list_models(
    principal: Principal = Depends(authenticate), session: Session = Depends(get_session)
) -> dict[str, Any]:
    rows = registry.visible_models(session, principal.tenant_id)
    return {"object": "list", "data": [model_object(r) for r in rows], "has_more": False}


@router.get("/{model_id}", summary="Retrieve a model")
def get_model(
    model_id: str, principal: Principal = Depends(authenticate), session: Session = Depends(get_session)
) -> dict[str, Any]:
    row = registry.get_visible_model(session, principal.tenant_id, model_id)
    if row is None:
        raise not_found("model", model_id)
    return model_object(row)


@router.get("/{model_id}/content", summary="Download a fine-tuned model as a tar of save_pretrained output (extension)",
            response_class=FileResponse)
def model_content(
    model_id: str, principal: Principal = Depends(authenticate), session: Session = Depends(get_session)
) -> FileResponse:
    row = registry.get_visible_model(session, principal.tenant_id, model_id)
    if row is None:
        raise not_found("model", model_id)
    if row.tenant_id is None:
        raise APIError(403, f"'{model_id}' is a base model; only fine-tuned models can be downloaded",
                       type_="permission_error", code="base_model")
    source = Path(row.path)
    if not source.is_dir():
        raise APIError(409, f"the files of '{model_id}' are not available on this server", code="model_files_missing")
    # Built in a temporary file and removed after sending: a model can be far larger than memory allows.
    with tempfile.NamedTemporaryFile(suffix=".tar", delete=False) as handle, \
            tarfile.open(fileobj=handle, mode="w") as archive:
        archive.add(source, arcname=model_id.replace(":", "_"))
    name = model_id.replace(":", "_") + ".tar"
    return FileResponse(handle.name, filename=name, media_type="application/x-tar",
                        background=BackgroundTask(os.unlink, handle.name))


@router.delete("/{model_id}", summary="Delete a fine-tuned model")
def delete_model(
    model_id: str, principal: Principal = Depends(authenticate), session: Session = Depends(get_session)
) -> dict[str, Any]:
    row = registry.get_visible_model(session, principal.tenant_id, model_id)
    if row is None:
        raise not_found("model", model_id)
    if row.tenant_id is None:
        raise APIError(403, f"'{model_id}' is a base model; only fine-tuned models can be deleted",
                       type_="permission_error", code="base_model")
    row.deleted_at = utcnow()
    session.commit()
    return {"id": model_id, "object": "model", "deleted": True}
