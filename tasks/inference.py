"""Online inference on the ``inference`` queue: claim the requests' rows, run them, write and push their answers.

The worker runs a threads pool: concurrent requests wait in one process, and their model calls go to
`tasks.serving`'s runner, where those for the same model and endpoint share forward passes and models stay
warm (in a model process of its own in the inference-only worker).
"""

from __future__ import annotations

import base64
import logging
import math
import struct
import time
from collections.abc import Hashable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import redis

from core.clock import utcnow
from core.settings import get_settings
from db import inferences
from db.session import relaxed_engine
from domain import dispatch, storage
from domain.batching import BatcherRegistry
from domain.serving import EMBEDDINGS, TASK_FORGET_MODEL, ZERO_SHOT
from infra import cache, replies
from tasks import serving
from tasks.app import celery_app

log = logging.getLogger(__name__)

# Row claims and outcomes of concurrent requests share one statement each, like their forward passes: no
# window (whatever waits is taken at once), and while one statement runs the next requests gather.
ROWS = BatcherRegistry(0.0, get_settings().inference_concurrency, log_batches=False)

ENCODER_TASKS = {"/v1/classifications": "classification", "/v1/ner": "ner"}


def model_call(endpoint: str, model_id: str, model_path: str, request: dict[str, Any],
               request_id: str, tenant_id: str | None = None) -> serving.ModelCall:
    """The model work of one request to `endpoint`.

    Generation requests join the model's decode loop, where each keeps its own sampling parameters (a seeded
    one draws from its own generator, so its answer depends on its seed and not on its batch-mates); with
    `stream: true` their text goes to the request's stream as it grows.
    """
    if endpoint == "/v1/embeddings":
        return serving.ModelCall(model_id, model_path, EMBEDDINGS, "embed", list(request["input"]), lane=tenant_id)
    if endpoint == "/v1/classifications" and request.get("labels") is not None:
        # Zero-shot: each text travels with its labels, so requests with different labels share a pass. The
        # runner picks the scorer by the model: embeddings of an encoder, answer likelihood of a causal LM.
        labels = tuple(request["labels"])
        return serving.ModelCall(model_id, model_path, ZERO_SHOT, "zero_shot",
                                 [(text, labels) for text in request["input"]], lane=tenant_id)
    if endpoint in ENCODER_TASKS:
        return serving.ModelCall(model_id, model_path, ENCODER_TASKS[endpoint], "predict", list(request["input"]),
                                 lane=tenant_id)
    sampling = {k: request[k] for k in ("max_tokens", "temperature", "top_p", "stop", "seed", "n")}
    params = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in sampling.items()))
    method, inputs = ("generate", list(request["prompt"])) if endpoint == "/v1/completions" else (
        "chat", [request["messages"]])
    return serving.ModelCall(model_id, model_path, "generation", method, inputs, params,
                             size=len(inputs) * int(sampling["n"] or 1), lane=tenant_id,
                             stream=replies.stream_key(request_id) if request.get("stream") else None)


def _usage(results: list[list[dict[str, Any]]]) -> dict[str, int]:
    prompt = sum(choices[0]["prompt_tokens"] for choices in results if choices)
    completion = sum(c["completion_tokens"] for choices in results for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class InvalidParam(ValueError):
    """A request the model cannot serve as asked, because of one field (a 400 naming it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _embedding(vector: list[float], dimensions: int | None, encoding_format: str) -> list[float] | str:
    """One vector as the client asked for it: cut to `dimensions` (re-normalised), floats or base64."""
    if dimensions is not None:
        if dimensions > len(vector):
            raise InvalidParam("dimensions", f"the model's embeddings have {len(vector)} dimensions; "
                                             f"ask for at most that many, not {dimensions}")
        vector = vector[:dimensions]
        norm = math.sqrt(sum(x * x for x in vector))
        if norm > 0:
            vector = [x / norm for x in vector]
    if encoding_format == "base64":
        # OpenAI's format, which its SDKs decode: the float32 values, little-endian, base64-encoded.
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def response_body(endpoint: str, model_id: str, request_id: str, results: list[Any],
                  request: dict[str, Any] | None = None) -> dict[str, Any]:
    """The endpoint's response to a request whose model call gave `results` (one per input)."""
    if endpoint == "/v1/embeddings":
        options = request or {}
        dimensions, encoding = options.get("dimensions"), options.get("encoding_format") or "float"
        data = [{"object": "embedding", "index": i, "embedding": _embedding(r["embedding"], dimensions, encoding)}
                for i, r in enumerate(results)]
        tokens = sum(int(r["tokens"]) for r in results)
        return {"object": "list", "data": data, "model": model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    if endpoint == "/v1/classifications":
        return {"object": "list", "model": model_id, "data": [{"index": i, **p} for i, p in enumerate(results)]}
    if endpoint == "/v1/ner":
        return {"object": "list", "model": model_id,
                "data": [{"index": i, "entities": entities} for i, entities in enumerate(results)]}
    if endpoint == "/v1/completions":
        choices = [{"text": c["text"], "index": i * len(results[0]) + j, "logprobs": None,
                    "finish_reason": c["finish_reason"]}
                   for i, prompt in enumerate(results) for j, c in enumerate(prompt)]
        return {"id": f"cmpl-{request_id}", "object": "text_completion", "created": int(time.time()),
                "model": model_id, "choices": choices, "usage": _usage(results), "system_fingerprint": None}
    chat = [{"index": j, "message": {"role": "assistant", "content": c["text"], "refusal": None},
             "logprobs": None, "finish_reason": c["finish_reason"]} for j, c in enumerate(results[0])]
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id, "choices": chat, "usage": _usage(results), "system_fingerprint": None}


def respond(endpoint: str, model_id: str, model_path: str, request: dict[str, Any], request_id: str
            ) -> dict[str, Any]:
    """One request's response, computed on the calling thread (a batch file's generation lines)."""
    # A batch file's line is answered whole: no one reads a stream of it.
    results = serving.runner().run(model_call(endpoint, model_id, model_path, {**request, "stream": False},
                                              request_id))
    return response_body(endpoint, model_id, request_id, results, request)


def _claim_rows(ids: list[str], _group: Hashable) -> list[inferences.Claim | None]:
    with relaxed_engine().connect() as conn:
        claimed = inferences.claim(conn, list(dict.fromkeys(ids)))
    # A message delivered twice at once: only its first copy runs.
    return [claimed.pop(inference_id, None) for inference_id in ids]


def _finish_rows(outcomes: list[tuple[str, dict[str, Any]]], _group: Hashable) -> list[None]:
    """Write the outcomes to their rows (the truth, for polls), then push each to its waiting caller."""
    with relaxed_engine().connect() as conn:
        inferences.finish(conn, outcomes, utcnow())
    try:
        replies.push_replies(outcomes)
    except redis.RedisError:
        # The rows hold the answers: callers whose wait ends poll them.
        log.warning("reply channel unavailable; %d answers are in their rows only", len(outcomes))
    return [None] * len(outcomes)


def _failed(claim: inferences.Claim, exc: BaseException) -> dict[str, Any]:
    """The reply a caller should see for a request that raised `exc`."""
    if isinstance(exc, ValueError):
        # The request cannot be served as asked (a prompt longer than the context, say).
        error = {"status": 400, "message": str(exc), "type": "invalid_request_error", "code": "invalid_request",
                 "param": getattr(exc, "param", None)}
    elif isinstance(exc, LookupError):
        error = {"status": 404, "message": str(exc), "type": "invalid_request_error", "code": "model_not_found"}
    else:
        log.error("inference %s failed", claim.id, exc_info=exc)
        error = {"status": 500, "message": f"inference failed: {type(exc).__name__}", "type": "server_error",
                 "code": "inference_error"}
    return {"status": "failed", "response": None, "error": error}


def _start(claim: inferences.Claim) -> Future[list[Any]] | dict[str, Any]:
    """Hand a claimed request's model call to the runner: its future results, or at once its failure."""
    try:
        if not claim.servable() or claim.model_path is None:
            raise LookupError(f"model '{claim.model_id}' no longer exists")
        # A model kept in object storage is read from this machine's cache (downloaded on first use).
        try:
            model_path = storage.materialize(claim.model_path)
        except FileNotFoundError:
            raise LookupError(f"model '{claim.model_id}' no longer exists") from None
        return serving.runner().submit(model_call(claim.endpoint, claim.model_id, str(model_path), claim.request,
                                                  claim.id, claim.tenant_id))
    except Exception as exc:
        return _failed(claim, exc)


def _reply(claim: inferences.Claim, results: Future[list[Any]]) -> dict[str, Any]:
    try:
        response = response_body(claim.endpoint, claim.model_id, claim.id, results.result(), claim.request)
    except Exception as exc:
        return _failed(claim, exc)
    return {"status": "succeeded", "response": response, "error": None}


# No task events: at hundreds of requests a second, three event messages each cost more broker traffic
# and worker CPU than the request's own work. Flower shows training and maintenance; the API's Prometheus
# metrics count and time every inference request.
@celery_app.task(name=dispatch.TASK_INFER, send_events=False)
def run_inference(inference_ids: list[str] | str) -> None:
    """Answer the requests of one message: claim their rows, run them, write and push each answer.

    The API sends concurrent requests together (one message, their IDs). Their model calls go to the runner
    at once, where they join shared forward passes; answers are written and pushed as they come, those that
    come together in one statement.
    """
    ids = [inference_ids] if isinstance(inference_ids, str) else list(inference_ids)
    claims = [claim for claim in ROWS.call("claim", _claim_rows, ids) if claim is not None]
    running: dict[Future[list[Any]], inferences.Claim] = {}
    outcomes: list[tuple[str, dict[str, Any]]] = []
    for claim in claims:
        started = _start(claim)
        if isinstance(started, Future):
            running[started] = claim
        else:
            outcomes.append((claim.id, started))
    if outcomes:
        ROWS.call("finish", _finish_rows, outcomes)
    while running:
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        finished = [(running.pop(future), future) for future in done]
        ROWS.call("finish", _finish_rows, [(claim.id, _reply(claim, future)) for claim, future in finished])


@celery_app.task(name=TASK_FORGET_MODEL, send_events=False)
def forget_model(model_id: str) -> None:
    """A deleted model's cached answers: unreachable from now on (idempotent enough: a redelivery bumps again)."""
    cache.forget_model(model_id)
