"""Which models a tenant may run for which task: one rule for online requests and batch lines."""

from __future__ import annotations

from db import registry


def serving_refusal(tenant_id: str, model_id: str, task: str) -> tuple[str, str] | None:
    """None when the tenant may run ``task`` on the model, else (error code, message)."""
    model = registry.visible_serving_facts(tenant_id, model_id)
    if model is None:
        return "model_not_found", f"no model named '{model_id}'"
    if task not in model.tasks:
        return "unsupported_task", f"'{model_id}' does not serve {task}; it serves {', '.join(model.tasks)}"
    if model.kind == "base" and task in ("classification", "ner"):
        return "model_not_fine_tuned", (f"'{model_id}' is a base encoder without a trained {task} head; "
                                        "fine-tune it first")
    return None
