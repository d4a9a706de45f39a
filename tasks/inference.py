"""Online inference on the ``inference`` queue, with fine-tuned models kept warm in the worker process."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from db.models import Inference, Model
from db.session import transaction
from domain import dispatch, replies
from domain.clock import utcnow
from domain.settings import get_settings
from tasks.app import celery_app

log = logging.getLogger(__name__)

MAX_WARM_MODELS = 4


class ModelCache:
    """Predictors by model ID, least recently used evicted; each loads once per process."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_id: str, path: Path) -> Any:
        with self._lock:
            if model_id in self._items:
                self._items.move_to_end(model_id)
                return self._items[model_id]
            from training.devices import configure_cpu
            from training.predict import ClassificationPredictor

            configure_cpu(get_settings().torch_threads)
            predictor = ClassificationPredictor(path)
            self._items[model_id] = predictor
            while len(self._items) > self.capacity:
                evicted, _ = self._items.popitem(last=False)
                log.info("evicted %s from the model cache", evicted)
            return predictor


CACHE = ModelCache(MAX_WARM_MODELS)


def _classify(model: Model, request: dict[str, Any]) -> dict[str, Any]:
    predictor = CACHE.get(model.id, Path(model.path))
    predictions = predictor.predict(list(request["input"]))
    return {"object": "list", "model": model.id,
            "data": [{"index": i, **p} for i, p in enumerate(predictions)]}


HANDLERS = {"/v1/classifications": _classify}


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
        response = HANDLERS[endpoint](model, request)
        reply = {"status": "succeeded", "response": response, "error": None}
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
