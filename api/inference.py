"""Online inference: the API hands each request to an inference worker and waits for its answer."""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable
from typing import Any

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.deps import Principal, get_session, require
from api.errors import APIError, not_found
from db import inferences
from db.models import Inference
from domain import dispatch, ids, replies
from domain.batching import BatcherRegistry
from domain.clock import unix, utcnow
from domain.requests import ChatRequest, ClassificationRequest, CompletionRequest, NerRequest
from domain.serving import serving_refusal
from domain.settings import get_settings

log = logging.getLogger(__name__)
router = APIRouter(tags=["inference"])
inference_scope = require("inference")
_WAIT = re.compile(r"wait=(\d+(?:\.\d+)?)")


# Documented on every route that can answer with the handle instead of the result.
ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {"description": "Still running after `Prefer: wait=N`: the inference object (`inf_…`), to poll at "
                         "`GET /v1/inferences/{id}` until it carries the `response`."},
}


def inference_object(row: Inference) -> dict[str, Any]:
    return {"id": row.id, "object": "inference", "status": row.status, "endpoint": row.endpoint,
            "model": row.model, "created_at": unix(row.created_at), "finished_at": unix(row.finished_at),
            "response": row.response, "error": row.error}


def _wait_seconds(request: Request) -> float:
    match = _WAIT.search(request.headers.get("prefer", ""))
    return min(float(match.group(1)), 600.0) if match else get_settings().inference_wait_seconds


def check_serveable(principal: Principal, model_id: str, task: str) -> None:
    refusal = serving_refusal(principal.tenant_id, model_id, task)
    if refusal is not None:
        code, message = refusal
        raise APIError(400, f"model: {message}", param="model", code=code)


BROKER_DOWN = "The broker is unavailable; retry shortly."
# Concurrent requests' rows go in one statement and their IDs to the workers in one message: per request,
# an insert and a Celery publish cost the API and Postgres more than all the rest of its handling, and each
# message costs the worker a receive. No window: whatever waits is sent at once, and while one send runs
# the next requests gather.
SENDS = BatcherRegistry(0.0, 64, log_batches=False)


def _send(requests: list[inferences.NewRequest], _group: Hashable) -> list[bool]:
    """Insert the requests' rows and send their IDs to the inference queue; False for each if it is down.

    Sent at once rather than after a commit (the rows are already in), so a broker outage is known while
    the callers still wait, and their rows say why they failed.
    """
    inferences.create(requests)
    if dispatch.publish(dispatch.StagedTask(dispatch.TASK_INFER, ([r.id for r in requests],))):
        return [True] * len(requests)
    error = {"status": 503, "message": BROKER_DOWN, "type": "server_error", "code": "broker_unavailable"}
    inferences.finish([(r.id, {"status": "failed", "response": None, "error": error}) for r in requests], utcnow())
    return [False] * len(requests)


def run_inference(
    request: Request, session: Session, principal: Principal, endpoint: str, model: str, payload: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Persist the request, send it to the inference queue, and wait for its answer within the caller's wait.

    Returns (response body, None), or (None, the inference object to poll) when the answer did not come
    in time; a failed inference raises its APIError.
    """
    inference_id = ids.new_id(ids.INFERENCE)
    new = inferences.NewRequest(inference_id, principal.tenant_id, endpoint, model, payload, utcnow())
    if not SENDS.call("send", _send, [new])[0]:
        raise APIError(503, BROKER_DOWN, type_="server_error", code="broker_unavailable", headers={"Retry-After": "5"})
    # No connection is held while it waits (the key, model and row statements above each returned theirs):
    # otherwise more concurrent callers than the pool has connections would queue for one, not an answer.
    assert not session.in_transaction()
    try:
        reply = replies.wait_reply(inference_id, _wait_seconds(request))
    except redis.RedisError:
        # The request is queued; only the fast path is gone. The caller polls the row instead.
        log.warning("reply channel of %s unavailable; answering with the handle", inference_id)
        reply = None
    if reply is None:
        row = session.get(Inference, inference_id, populate_existing=True)
        assert row is not None  # inserted above; rows go only with their tenant
        if row.status not in ("succeeded", "failed"):
            return None, inference_object(row)
        reply = {"status": row.status, "response": row.response, "error": row.error}
    if reply["status"] == "failed":
        err = reply["error"] or {}
        raise APIError(int(err.get("status", 500)), err.get("message", "inference failed"),
                       type_=err.get("type", "server_error"), code=err.get("code"))
    response: dict[str, Any] = reply["response"]
    return response, {}


def submit(
    request: Request, session: Session, principal: Principal, endpoint: str, model: str, payload: dict[str, Any]
) -> JSONResponse:
    """The response of the online endpoints: the answer, or 202 with a handle past the caller's wait."""
    response, handle = run_inference(request, session, principal, endpoint, model, payload)
    if response is None:
        return JSONResponse(handle, status_code=202)
    return JSONResponse(response)


@router.post("/v1/classifications", responses=ACCEPTED, summary="Classify texts with a fine-tuned model (extension)")
def classify(
    body: ClassificationRequest,
    request: Request,
    principal: Principal = Depends(inference_scope),
    session: Session = Depends(get_session),
) -> JSONResponse:
    check_serveable(principal, body.model, "classification")
    inputs = [body.input] if isinstance(body.input, str) else body.input
    return submit(request, session, principal, "/v1/classifications", body.model,
                  {"model": body.model, "input": inputs})


@router.post("/v1/ner", responses=ACCEPTED, summary="Find named entities with a fine-tuned NER model (extension)")
def ner(
    body: NerRequest,
    request: Request,
    principal: Principal = Depends(inference_scope),
    session: Session = Depends(get_session),
) -> JSONResponse:
    check_serveable(principal, body.model, "ner")
    inputs = [body.input] if isinstance(body.input, str) else body.input
    return submit(request, session, principal, "/v1/ner", body.model, {"model": body.model, "input": inputs})


@router.post("/v1/completions", responses=ACCEPTED, summary="Complete prompts (OpenAI Completions)")
def completions(
    body: CompletionRequest,
    request: Request,
    principal: Principal = Depends(inference_scope),
    session: Session = Depends(get_session),
) -> JSONResponse:
    check_serveable(principal, body.model, "generation")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    return submit(request, session, principal, "/v1/completions", body.model,
                  {"model": body.model, "prompt": prompts, **body.sampling()})


@router.post("/v1/chat/completions", responses=ACCEPTED, summary="Answer a conversation (OpenAI Chat Completions)")
def chat_completions(
    body: ChatRequest,
    request: Request,
    principal: Principal = Depends(inference_scope),
    session: Session = Depends(get_session),
) -> JSONResponse:
    check_serveable(principal, body.model, "generation")
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    return submit(request, session, principal, "/v1/chat/completions", body.model,
                  {"model": body.model, "messages": messages, **body.sampling()})


@router.get("/v1/inferences/{inference_id}", summary="Poll an online inference request (extension)")
def get_inference(
    inference_id: str, principal: Principal = Depends(inference_scope), session: Session = Depends(get_session)
) -> dict[str, Any]:
    row = session.get(Inference, inference_id)
    if row is None or row.tenant_id != principal.tenant_id:
        raise not_found("inference", inference_id)
    return inference_object(row)
