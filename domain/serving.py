"""Which models a tenant may run for which task: one rule for online requests and batch lines."""

from __future__ import annotations

from sqlalchemy.orm import Session

from db import registry
from db.models import Model


def serving_refusal(session: Session, tenant_id: str, model_id: str, task: str) -> tuple[Model | None, str, str]:
    """The model, and ("", "") when the tenant may run ``task`` on it, else (None, code, message)."""
    model = registry.get_visible_model(session, tenant_id, model_id)
    if model is None:
        return None, "model_not_found", f"no model named '{model_id}'"
    if task not in model.tasks:
        return None, "unsupported_task", f"'{model_id}' does not serve {task}; it serves {', '.join(model.tasks)}"
    if model.kind == "base" and task in ("classification", "ner"):
        return None, "model_not_fine_tuned", (f"'{model_id}' is a base encoder without a trained {task} head; "
                                              "fine-tune it first")
    return model, "", ""
