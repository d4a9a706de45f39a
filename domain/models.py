"""The models service: base models from the registry and each tenant's fine-tuned ones."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core.clock import unix, utcnow
from core.errors import ServiceError, not_found
from db import registry
from db.models import Model
from domain import audit, dispatch
from domain.serving import TASK_FORGET_MODEL, served_tasks


def model_object(row: Model) -> dict[str, Any]:
    return {
        "id": row.id, "object": "model", "created": unix(row.created_at), "owned_by": row.owned_by,
        "kind": row.kind, "tasks": served_tasks(row.tasks), "architecture": row.architecture,
        "base_model": row.base_model, "fine_tuning_job": row.job_id, "description": row.description,
    }


def _own_model(session: Session, tenant_id: str, model_id: str, action: str) -> Model:
    row = registry.get_visible_model(session, tenant_id, model_id)
    if row is None:
        raise not_found("model", model_id)
    if row.tenant_id is None:
        raise ServiceError(403, f"'{model_id}' is a base model; only fine-tuned models can be {action}",
                           type_="permission_error", code="base_model")
    return row


def all_models(session: Session) -> list[dict[str, Any]]:
    """Every live model of every tenant, for operators (`llmos models list`), with where its files are."""
    return [{**model_object(row), "path": row.path} for row in registry.all_models(session)]


def register_base_model(session: Session, *, name: str, path: str, tasks: list[str], architecture: str,
                        description: str, actor: str | None = None) -> None:
    """Add (or update) a base model every tenant may use; an import by ``actor`` goes in the audit log (the
    built-in models registered at every start do not)."""
    registry.upsert_base_model(session, name, path, tasks, architecture, description)
    if actor is not None:
        audit.record(session, actor=actor, action="model.imported", target=name,
                     details={"tasks": tasks, "architecture": architecture})


def list_models(session: Session, *, tenant_id: str) -> dict[str, Any]:
    rows = registry.visible_models(session, tenant_id)
    return {"object": "list", "data": [model_object(r) for r in rows], "has_more": False}


def get_model(session: Session, *, tenant_id: str, model_id: str) -> dict[str, Any]:
    row = registry.get_visible_model(session, tenant_id, model_id)
    if row is None:
        raise not_found("model", model_id)
    return model_object(row)


def files_of(session: Session, *, tenant_id: str, model_id: str) -> str:
    """Where a fine-tuned model's `save_pretrained` output is (a `domain.storage` location), to download."""
    return _own_model(session, tenant_id, model_id, "downloaded").path


def delete_model(session: Session, *, tenant_id: str, model_id: str) -> dict[str, Any]:
    row = _own_model(session, tenant_id, model_id, "deleted")
    row.deleted_at = utcnow()
    # Its cached answers stop being found (serving refuses a deleted model anyway; this frees their keys
    # from every lookup, including those of requests already past that check).
    dispatch.enqueue_after_commit(session, TASK_FORGET_MODEL, model_id, queue=dispatch.QUEUE_CPU)
    return {"id": model_id, "object": "model", "deleted": True}
