"""Models: base models from the registry and each tenant's fine-tuned ones."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

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
