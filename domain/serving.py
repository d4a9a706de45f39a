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

# Tasks a model's registry row names that mean it is an encoder (base, or fine-tuned with a head on one).
ENCODER_TASKS = ("classification", "ner")
EMBEDDINGS = "embeddings"
GENERATION = "generation"
# Not a model task of its own: `labels` on /v1/classifications, served by any model that serves embeddings
# (similarity to label prompts) or generation (each label's likelihood as the answer).
ZERO_SHOT = "zero-shot"


def served_tasks(tasks: list[str]) -> list[str]:
    """What a model serves: its registered tasks, and embeddings for an encoder (its hidden states, pooled)."""
    if EMBEDDINGS not in tasks and any(task in ENCODER_TASKS for task in tasks):
        return [*tasks, EMBEDDINGS]
    return list(tasks)


def serving_refusal(conn: Connection, tenant_id: str, model_id: str, task: str) -> tuple[str, str] | None:
    """None when the tenant may run ``task`` on the model, else (error code, message)."""
    model = registry.visible_serving_facts(conn, tenant_id, model_id)
    if model is None:
        return "model_not_found", f"no model named '{model_id}'"
    tasks = served_tasks(model.tasks)
    if task == ZERO_SHOT:
        if EMBEDDINGS not in tasks and GENERATION not in tasks:
            return "unsupported_task", (f"'{model_id}' cannot classify zero-shot: labels need an encoder or a "
                                        f"generation model; it serves {', '.join(tasks)}")
        return None
    if task not in tasks:
        return "unsupported_task", f"'{model_id}' does not serve {task}; it serves {', '.join(tasks)}"
    if model.kind == "base" and task in ENCODER_TASKS:
        return "model_not_fine_tuned", (f"'{model_id}' is a base encoder without a trained {task} head; "
                                        "fine-tune it first, or send labels to classify zero-shot")
    return None


# Sent after a model's deletion commits: the worker moves the model's response-cache generation on.
TASK_FORGET_MODEL = "llmos.inference.forget_model"
GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
CACHEABLE_ENDPOINTS = ("/v1/classifications", "/v1/ner", "/v1/embeddings", *GENERATION_ENDPOINTS)


def deterministic(endpoint: str, payload: dict[str, Any]) -> bool:
    """Whether the same request always gets the same answer from the same model, so it may be cached:
    classification, NER and embeddings always; generation only when greedy (temperature 0) and not streamed
    (a stream is its chunks as they are generated)."""
    if endpoint in GENERATION_ENDPOINTS:
        return payload.get("temperature") == 0 and not payload.get("stream")
    return endpoint in CACHEABLE_ENDPOINTS


def complete_answer(endpoint: str, payload: dict[str, Any], response: dict[str, Any]) -> bool:
    """Whether an answer is the model's whole answer: a generation cut short by the worker's wall-clock limit
    (`finish_reason` length with fewer than `max_tokens` tokens) would answer differently next time."""
    if endpoint not in GENERATION_ENDPOINTS:
        return True
    choices = response.get("choices") or []
    cut = [c for c in choices if c.get("finish_reason") == "length"]
    if not cut:
        return True
    # Tokens are counted per answer, not per choice: only when every choice ran to max_tokens is it certain.
    used = (response.get("usage") or {}).get("completion_tokens")
    return len(cut) == len(choices) and used == len(choices) * payload.get("max_tokens", 0)


def inference_object(row: Inference) -> dict[str, Any]:
    return {"id": row.id, "object": "inference", "status": row.status, "endpoint": row.endpoint,
            "model": row.model, "created_at": unix(row.created_at), "finished_at": unix(row.finished_at),
            "response": row.response, "error": row.error}


def get_inference(session: Session, *, tenant_id: str, inference_id: str) -> dict[str, Any]:
    row = inferences.get(session, tenant_id, inference_id)
    if row is None:
        raise not_found("inference", inference_id)
    return inference_object(row)
