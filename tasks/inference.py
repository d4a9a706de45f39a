"""Online inference on the ``inference`` queue, with fine-tuned models kept warm in the worker process."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from db.models import Inference, Model
from db.session import transaction
from domain import dispatch, replies
from domain.clock import utcnow
from domain.settings import get_settings
from tasks import recipes
from tasks.app import celery_app

log = logging.getLogger(__name__)

MAX_WARM_MODELS = 4


class ModelCache:
    """Predictors by model ID, least recently used evicted; each loads once per process."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_id: str, task: str, path: Path) -> Any:
        key = f"{task}:{model_id}"
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            from training.devices import configure_cpu

            configure_cpu(get_settings().torch_threads)
            predictor = recipes.predictor(task, path)
            self._items[key] = predictor
            while len(self._items) > self.capacity:
                evicted, _ = self._items.popitem(last=False)
                log.info("evicted %s from the model cache", evicted)
            return predictor


CACHE = ModelCache(MAX_WARM_MODELS)


def _classify(model: Model, request: dict[str, Any], request_id: str) -> dict[str, Any]:
    predictions = CACHE.get(model.id, "classification", Path(model.path)).predict(list(request["input"]))
    return {"object": "list", "model": model.id,
            "data": [{"index": i, **p} for i, p in enumerate(predictions)]}


def _ner(model: Model, request: dict[str, Any], request_id: str) -> dict[str, Any]:
    found = CACHE.get(model.id, "ner", Path(model.path)).predict(list(request["input"]))
    return {"object": "list", "model": model.id,
            "data": [{"index": i, "entities": entities} for i, entities in enumerate(found)]}


def _usage(results: list[list[dict[str, Any]]]) -> dict[str, int]:
    prompt = sum(choices[0]["prompt_tokens"] for choices in results if choices)
    completion = sum(c["completion_tokens"] for choices in results for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sampling(request: dict[str, Any]) -> dict[str, Any]:
    return {k: request[k] for k in ("max_tokens", "temperature", "top_p", "stop", "seed", "n")}


def _completions(model: Model, request: dict[str, Any], request_id: str) -> dict[str, Any]:
    results = CACHE.get(model.id, "generation", Path(model.path)).generate(list(request["prompt"]),
                                                                           **_sampling(request))
    choices = [{"text": c["text"], "index": i * len(results[0]) + j, "logprobs": None,
                "finish_reason": c["finish_reason"]} for i, prompt in enumerate(results) for j, c in enumerate(prompt)]
    return {"id": f"cmpl-{request_id}", "object": "text_completion", "created": int(time.time()),
            "model": model.id, "choices": choices, "usage": _usage(results), "system_fingerprint": None}


def _chat(model: Model, request: dict[str, Any], request_id: str) -> dict[str, Any]:
    results = CACHE.get(model.id, "generation", Path(model.path)).chat([request["messages"]], **_sampling(request))
    choices = [{"index": j, "message": {"role": "assistant", "content": c["text"], "refusal": None},
                "logprobs": None, "finish_reason": c["finish_reason"]} for j, c in enumerate(results[0])]
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": model.id, "choices": choices, "usage": _usage(results), "system_fingerprint": None}


HANDLERS = {"/v1/classifications": _classify, "/v1/ner": _ner, "/v1/completions": _completions,
            "/v1/chat/completions": _chat}


@celery_app.task(name=dispatch.TASK_INFER)
def run_inference(inference_id: str) -> None:
    """Answer one request: write the response to its row, then push it to the waiting caller."""
    with transaction() as session:
        row = session.get(Inference, inference_id, with_for_update=True)
        if row is None or row.status != "queued":
            return
        row.status = "running"
        model = session.get(Model, row.model)
        endpoint, request, tenant_id = row.endpoint, row.request, row.tenant_id
    reply: dict[str, Any]
    try:
        if model is None or model.deleted_at is not None or model.tenant_id not in (None, tenant_id):
            raise LookupError(f"model '{request.get('model')}' no longer exists")
        response = HANDLERS[endpoint](model, request, inference_id)
        reply = {"status": "succeeded", "response": response, "error": None}
    except ValueError as exc:
        # The request cannot be served as asked (a prompt longer than the context, say).
        reply = {"status": "failed", "response": None,
                 "error": {"status": 400, "message": str(exc), "type": "invalid_request_error",
                           "code": "invalid_request"}}
    except LookupError as exc:
        reply = {"status": "failed", "response": None,
                 "error": {"status": 404, "message": str(exc), "type": "invalid_request_error",
                           "code": "model_not_found"}}
    except Exception as exc:
        log.exception("inference %s failed", inference_id)
        reply = {"status": "failed", "response": None,
                 "error": {"status": 500, "message": f"inference failed: {type(exc).__name__}",
                           "type": "server_error", "code": "inference_error"}}
    with transaction() as session:
        row = session.get(Inference, inference_id)
        if row is not None:
            row.status, row.response, row.error = reply["status"], reply["response"], reply["error"]
            row.finished_at = utcnow()
    replies.push_reply(inference_id, reply)
