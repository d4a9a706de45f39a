"""The inference service: which models a tenant may run for which task (one rule for online requests and
batch lines), and the inference objects callers poll."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from core.clock import unix
from core.errors import not_found
from db import inferences, registry
from db.models import Inference


def serving_refusal(conn: Connection, tenant_id: str, model_id: str, task: str) -> tuple[str, str] | None:
    """None when the tenant may run ``task`` on the model, else (error code, message)."""
    model = registry.visible_serving_facts(conn, tenant_id, model_id)
    if model is None:
        return "model_not_found", f"no model named '{model_id}'"
    if task not in model.tasks:
        return "unsupported_task", f"'{model_id}' does not serve {task}; it serves {', '.join(model.tasks)}"
    if model.kind == "base" and task in ("classification", "ner"):
        return "model_not_fine_tuned", (f"'{model_id}' is a base encoder without a trained {task} head; "
                                        "fine-tune it first")
    return None


def inference_object(row: Inference) -> dict[str, Any]:
    return {"id": row.id, "object": "inference", "status": row.status, "endpoint": row.endpoint,
            "model": row.model, "created_at": unix(row.created_at), "finished_at": unix(row.finished_at),
            "response": row.response, "error": row.error}


def get_inference(session: Session, *, tenant_id: str, inference_id: str) -> dict[str, Any]:
    row = inferences.get(session, tenant_id, inference_id)
    if row is None:
        raise not_found("inference", inference_id)
    return inference_object(row)
