"""Online inference on the ``inference`` queue, with fine-tuned models kept warm in the worker process.

The worker runs a threads pool: concurrent requests wait in one process, where `BATCHERS` groups those
for the same model and endpoint into shared forward passes and `CACHE` keeps models warm within a budget.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import redis

from db import inferences
from domain import dispatch, replies
from domain.clock import utcnow
from domain.settings import get_settings
from tasks import recipes
from tasks.app import celery_app
from tasks.batching import BatcherRegistry

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def model_bytes(predictor: Any) -> int:
    """Memory of a predictor's model: its parameters and buffers (tied weights counted once)."""
    model = predictor.model
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ModelCache:
    """Predictors by (task, model ID) within a memory budget, least recently used evicted first.

    Each model loads once per process, however many threads ask for it at once: a lock per key serialises
    its load while other models load or serve meanwhile. A model bigger than the whole budget still
    loads, alone. Predictors are thread-safe, so every caller gets the shared instance.
    """

    def __init__(self, budget_bytes: int, load: Callable[[str, Path], Any] = recipes.predictor) -> None:
        self.budget_bytes = budget_bytes
        self._load = load
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        # One lock per key ever loaded: tiny, and never dropping them means no two loads of one key race.
        self._key_locks: dict[str, threading.Lock] = {}
        self.loads = 0

    def get(self, model_id: str, task: str, path: Path) -> Any:
        """The warm predictor for `model_id`'s `task`, loaded from `path` on first use."""
        key = f"{task}:{model_id}"
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                hit = self._hit(key)
                if hit is not None:
                    return hit
            from training.devices import configure_cpu

            configure_cpu(get_settings().torch_threads)
            started = time.perf_counter()
            predictor = self._load(task, path)
            size = model_bytes(predictor)
            with self._lock:
                self.loads += 1
                self._items[key] = (predictor, size)
                self._evict(keep=key)
            log.info("loaded %s (%.1f MiB) in %.2fs", key, size / MIB, time.perf_counter() - started)
            return predictor

    def _hit(self, key: str) -> Any:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def _evict(self, keep: str) -> None:
        """Drop least recently used models until the warm ones fit the budget (call with the lock held)."""
        if self._items[keep][1] > self.budget_bytes:
            log.warning("%s needs %.1f MiB, more than the model cache's whole budget of %.1f MiB; kept alone",
                        keep, self._items[keep][1] / MIB, self.budget_bytes / MIB)
        while self.used_bytes() > self.budget_bytes and len(self._items) > 1:
            evicted = next(k for k in self._items if k != keep)
            _, size = self._items.pop(evicted)
            # Requests still running on it keep their reference; its memory goes when they finish.
            log.info("evicted %s (%.1f MiB) from the model cache", evicted, size / MIB)

    def used_bytes(self) -> int:
        """Memory of the models warm now."""
        return sum(size for _, size in self._items.values())

    def keys(self) -> list[str]:
        """Warm models' keys, least recently used first."""
        with self._lock:
            return list(self._items)


_settings = get_settings()
CACHE = ModelCache(_settings.model_cache_mb * MIB)
BATCHERS = BatcherRegistry(_settings.inference_batch_window_ms / 1000, _settings.inference_max_batch_size)
# Row claims and outcomes of concurrent requests share one statement each, like their forward passes: no
# window (whatever waits is taken at once), and while one statement runs the next requests gather.
ROWS = BatcherRegistry(0.0, _settings.inference_concurrency, log_batches=False)


def _batched(model_id: str, model_path: str, task: str, method: str, inputs: list[Any],
             sampling: dict[str, Any] | None = None, solo: str | None = None) -> list[Any]:
    """Run `inputs` through the model in a shared batch with concurrent requests for the same endpoint.

    Generation requests share a batch only when their sampling parameters are equal; a seeded one runs
    alone (`solo`), so its answer depends on its seed and not on what it happened to be batched with.
    """
    max_size, path = BATCHERS.max_size, Path(model_path)

    def run(batch: list[Any], group: Hashable) -> list[Any]:
        predictor = CACHE.get(model_id, task, path)
        if method == "predict":
            results: list[Any] = predictor.predict(batch, batch_size=max_size)
        else:
            params: tuple[tuple[str, Any], ...] = group[0]  # type: ignore[index]
            results = getattr(predictor, method)(batch, **dict(params), batch_size=max_size)
        return results

    if sampling is None:
        return BATCHERS.call((task, method, model_id), run, inputs)
    params = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in sampling.items()))
    size = len(inputs) * int(sampling.get("n") or 1)
    return BATCHERS.call((task, method, model_id), run, inputs, group=(params, solo), size=size)


# Handlers: (model ID, model directory, request body, request ID) -> the endpoint's response body.
Handler = Callable[[str, str, dict[str, Any], str], dict[str, Any]]


def _classify(model_id: str, model_path: str, request: dict[str, Any], request_id: str) -> dict[str, Any]:
    predictions = _batched(model_id, model_path, "classification", "predict", list(request["input"]))
    return {"object": "list", "model": model_id,
            "data": [{"index": i, **p} for i, p in enumerate(predictions)]}


def _ner(model_id: str, model_path: str, request: dict[str, Any], request_id: str) -> dict[str, Any]:
    found = _batched(model_id, model_path, "ner", "predict", list(request["input"]))
    return {"object": "list", "model": model_id,
            "data": [{"index": i, "entities": entities} for i, entities in enumerate(found)]}


def _usage(results: list[list[dict[str, Any]]]) -> dict[str, int]:
    prompt = sum(choices[0]["prompt_tokens"] for choices in results if choices)
    completion = sum(c["completion_tokens"] for choices in results for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sampling(request: dict[str, Any]) -> dict[str, Any]:
    return {k: request[k] for k in ("max_tokens", "temperature", "top_p", "stop", "seed", "n")}


def _completions(model_id: str, model_path: str, request: dict[str, Any], request_id: str) -> dict[str, Any]:
    sampling = _sampling(request)
    results = _batched(model_id, model_path, "generation", "generate", list(request["prompt"]), sampling,
                       solo=request_id if sampling["seed"] is not None else None)
    choices = [{"text": c["text"], "index": i * len(results[0]) + j, "logprobs": None,
                "finish_reason": c["finish_reason"]} for i, prompt in enumerate(results) for j, c in enumerate(prompt)]
    return {"id": f"cmpl-{request_id}", "object": "text_completion", "created": int(time.time()),
            "model": model_id, "choices": choices, "usage": _usage(results), "system_fingerprint": None}


def _chat(model_id: str, model_path: str, request: dict[str, Any], request_id: str) -> dict[str, Any]:
    sampling = _sampling(request)
    results = _batched(model_id, model_path, "generation", "chat", [request["messages"]], sampling,
                       solo=request_id if sampling["seed"] is not None else None)
    choices = [{"index": j, "message": {"role": "assistant", "content": c["text"], "refusal": None},
                "logprobs": None, "finish_reason": c["finish_reason"]} for j, c in enumerate(results[0])]
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id, "choices": choices, "usage": _usage(results), "system_fingerprint": None}


HANDLERS: dict[str, Handler] = {"/v1/classifications": _classify, "/v1/ner": _ner,
                                "/v1/completions": _completions, "/v1/chat/completions": _chat}


def _claim_rows(ids: list[str], _group: Hashable) -> list[inferences.Claim | None]:
    claimed = inferences.claim(list(dict.fromkeys(ids)))
    # A message delivered twice at once: only its first copy runs.
    return [claimed.pop(inference_id, None) for inference_id in ids]


def _finish_rows(outcomes: list[tuple[str, dict[str, Any]]], _group: Hashable) -> list[None]:
    """Write the outcomes to their rows (the truth, for polls), then push each to its waiting caller."""
    inferences.finish(outcomes, utcnow())
    try:
        replies.push_replies(outcomes)
    except redis.RedisError:
        # The rows hold the answers: callers whose wait ends poll them.
        log.warning("reply channel unavailable; %d answers are in their rows only", len(outcomes))
    return [None] * len(outcomes)


def answer(claim: inferences.Claim) -> dict[str, Any]:
    """The reply to a claimed request: its response, or the error a caller should see."""
    try:
        if not claim.servable() or claim.model_path is None:
            raise LookupError(f"model '{claim.model_id}' no longer exists")
        response = HANDLERS[claim.endpoint](claim.model_id, claim.model_path, claim.request, claim.id)
        return {"status": "succeeded", "response": response, "error": None}
    except ValueError as exc:
        # The request cannot be served as asked (a prompt longer than the context, say).
        return {"status": "failed", "response": None,
                "error": {"status": 400, "message": str(exc), "type": "invalid_request_error",
                          "code": "invalid_request"}}
    except LookupError as exc:
        return {"status": "failed", "response": None,
                "error": {"status": 404, "message": str(exc), "type": "invalid_request_error",
                          "code": "model_not_found"}}
    except Exception as exc:
        log.exception("inference %s failed", claim.id)
        return {"status": "failed", "response": None,
                "error": {"status": 500, "message": f"inference failed: {type(exc).__name__}",
                          "type": "server_error", "code": "inference_error"}}


# No task events: at hundreds of requests a second, three event messages each cost more broker traffic
# and worker CPU than the request's own work. Flower shows training and maintenance; the API's Prometheus
# metrics count and time every inference request.
@celery_app.task(name=dispatch.TASK_INFER, send_events=False)
def run_inference(inference_id: str) -> None:
    """Answer one request: claim its row, run it in a shared batch, write the outcome and push it back."""
    claim = ROWS.call("claim", _claim_rows, [inference_id])[0]
    if claim is None:
        return
    ROWS.call("finish", _finish_rows, [(inference_id, answer(claim))])
