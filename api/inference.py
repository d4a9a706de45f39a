"""Online inference: the API hands each request to an inference worker and waits for its answer."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

import anyio
import orjson
import redis
from fastapi import APIRouter, Depends, Request, Response

from api import objects
from api.boundary import read, read_rows
from api.deps import Principal, charge, require
from api.errors import APIError, JSONBody
from core import ids
from core.clock import utcnow
from core.settings import get_settings
from db import aio, inferences
from domain import dispatch, serving
from domain.requests import (
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
    NerRequest,
    estimated_tokens,
)
from domain.serving import EMBEDDINGS, ZERO_SHOT, complete_answer, deterministic, serving_refusal
from infra import broker, cache, ratelimit, replies

log = logging.getLogger(__name__)
router = APIRouter(tags=["inference"])
inference_scope = require("inference")
_WAIT = re.compile(r"wait=(\d+(?:\.\d+)?)")


# Documented on every route that can answer with the handle instead of the result.
ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {"model": objects.Inference,
          "description": "Still running after `Prefer: wait=N`: the inference object (`inf_…`), to poll at "
                         "`GET /v1/inferences/{id}` until it carries the `response`."},
}


def _wait_seconds(request: Request) -> float:
    match = _WAIT.search(request.headers.get("prefer", ""))
    settings = get_settings()
    wait = float(match.group(1)) if match else settings.inference_wait_seconds
    return min(wait, settings.inference_max_wait_seconds)


async def check_serveable(principal: Principal, model_id: str, task: str) -> None:
    refusal = await read_rows(serving_refusal, tenant_id=principal.tenant_id, model_id=model_id, task=task)
    if refusal is not None:
        code, message = refusal
        raise APIError(400, f"model: {message}", param="model", code=code)


BROKER_DOWN = "The broker is unavailable; retry shortly."
# At most this many requests share one insert and one message.
MAX_SEND = 64


class Sends:
    """Concurrent online requests go out as one insert and one Celery message carrying their IDs.

    Per request, an insert and a publish cost the API and Postgres more than all the rest of its handling,
    and each message costs the worker a receive. No window: whatever waits is sent at once, and while one
    send runs the next requests gather.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[inferences.NewRequest, asyncio.Future[bool]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def send(self, new: inferences.NewRequest) -> bool:
        """True once the request's row is in and its message sent; False if the broker refused it."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((new, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_SEND], self._pending[MAX_SEND:]
            try:
                sent = await _send([new for new, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(sent)


SENDS = Sends()


async def _send(requests: list[inferences.NewRequest]) -> bool:
    """Insert the requests' rows and send their IDs to the inference queue; False if the broker is down.

    Sent at once rather than after a commit (the rows are already in), so a broker outage is known while
    the callers still wait, and their rows say why they failed.
    """
    async with aio.relaxed_engine().connect() as conn:
        await conn.run_sync(inferences.create, requests)
    task = dispatch.StagedTask(dispatch.TASK_INFER, ([r.id for r in requests],))
    if await anyio.to_thread.run_sync(broker.publish, task):
        return True
    error = {"status": 503, "message": BROKER_DOWN, "type": "server_error", "code": "broker_unavailable"}
    async with aio.relaxed_engine().connect() as conn:
        await conn.run_sync(inferences.finish, [(r.id, {"status": "failed", "response": None, "error": error})
                                                for r in requests], utcnow())
    return False


async def run_inference(
    request: Request, principal: Principal, endpoint: str, model: str, payload: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Persist the request, send it to the inference queue, and wait for its answer within the caller's wait.

    Returns (response body, None), or (None, the inference object to poll) when the answer did not come
    in time; a failed inference raises its APIError. While it waits the request holds no thread and no
    database connection: only its coroutine and a Redis connection blocked in BLPOP.
    """
    inference_id = ids.new_id(ids.INFERENCE)
    new = inferences.NewRequest(inference_id, principal.tenant_id, endpoint, model, payload, utcnow())
    if not await SENDS.send(new):
        raise APIError(503, BROKER_DOWN, type_="server_error", code="broker_unavailable", headers={"Retry-After": "5"})
    try:
        reply = await replies.wait_reply_async(inference_id, _wait_seconds(request))
    except redis.RedisError:
        # The request is queued; only the fast path is gone. The caller polls the row instead.
        log.warning("reply channel of %s unavailable; answering with the handle", inference_id)
        reply = None
    if reply is None:
        row = await read(serving.get_inference, tenant_id=principal.tenant_id, inference_id=inference_id)
        if row["status"] not in ("succeeded", "failed"):
            return None, row
        reply = {"status": row["status"], "response": row["response"], "error": row["error"]}
    if reply["status"] == "failed":
        err = reply["error"] or {}
        raise APIError(int(err.get("status", 500)), err.get("message", "inference failed"),
                       type_=err.get("type", "server_error"), param=err.get("param"), code=err.get("code"))
    response: dict[str, Any] = reply["response"]
    return response, {}


CACHE_HEADER = "x-llmos-cache"


def _cache_refused(request: Request) -> bool:
    """`Cache-Control: no-cache` or `no-store` on the request: the model answers it, and its answer is not kept
    (HTTP's meaning of both, close enough: a client that asks for a fresh answer wants the model's)."""
    directives = request.headers.get("cache-control", "").lower()
    return "no-cache" in directives or "no-store" in directives


async def submit(
    request: Request, principal: Principal, endpoint: str, model: str, payload: dict[str, Any],
    shape: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Response:
    """The response of the online endpoints: the answer (through ``shape``, for the seed routes), or 202 with
    a handle past the caller's wait.

    A deterministic request (`domain.serving.deterministic`) is looked up in the tenant's response cache
    first, unless the client refuses it (`Cache-Control: no-cache`): a hit answers with the stored body,
    its tokens still counted against the tenant's limits as the model's answer would be.
    """
    estimate = estimated_tokens(endpoint, payload)
    found, key = None, ""
    if deterministic(endpoint, payload) and cache.enabled() and not _cache_refused(request):
        key = cache.digest(endpoint, payload)
        found = await cache.lookup(principal.tenant_id, model, key)
        if found is not None and found.body is not None:
            # Charged as a miss would be (the estimate, then the answer's own count), so a hit's headers and
            # refusals read exactly as the model's answer would have.
            await charge(request, principal.tenant_id, "tpm", principal.tpm, estimate)
            if principal.tpm is not None and found.tokens is not None:
                await ratelimit.adjust(principal.tenant_id, "tpm", principal.tpm, found.tokens - estimate)
            headers = {CACHE_HEADER: "hit"}
            if shape is None:
                return Response(found.body, media_type="application/json", headers=headers)
            return JSONBody(shape(orjson.loads(found.body)), headers=headers)
    missed = {CACHE_HEADER: "miss"}
    await charge(request, principal.tenant_id, "tpm", principal.tpm, estimate)
    response, handle = await run_inference(request, principal, endpoint, model, payload)
    if response is None:
        return JSONBody(handle, status_code=202, headers=missed)
    used = (response.get("usage") or {}).get("total_tokens")
    if principal.tpm is not None and isinstance(used, int):
        # The estimate counted every token the request might generate; count what it did.
        await ratelimit.adjust(principal.tenant_id, "tpm", principal.tpm, used - estimate)
    if found is not None and complete_answer(endpoint, payload, response):
        body = orjson.dumps(response)
        await cache.store(principal.tenant_id, model, key, found.generation, body,
                          used if isinstance(used, int) else None)
        if shape is None:
            return Response(body, media_type="application/json", headers=missed)
    return JSONBody(response if shape is None else shape(response), headers=missed)


@router.post("/v1/classifications", responses=ACCEPTED, response_model=objects.Classifications,
             summary="Classify texts with a fine-tuned model, or zero-shot with labels (extension)")
async def classify(
    body: ClassificationRequest,
    request: Request,
    principal: Principal = Depends(inference_scope),
) -> Response:
    await check_serveable(principal, body.model, "classification" if body.labels is None else ZERO_SHOT)
    return await submit(request, principal, "/v1/classifications", body.model, body.payload())


@router.post("/v1/embeddings", responses=ACCEPTED, response_model=objects.Embeddings,
             summary="Embed texts with an encoder model (OpenAI Embeddings)")
async def embeddings(
    body: EmbeddingRequest,
    request: Request,
    principal: Principal = Depends(inference_scope),
) -> Response:
    await check_serveable(principal, body.model, EMBEDDINGS)
    return await submit(request, principal, "/v1/embeddings", body.model, body.payload())


@router.post("/v1/ner", responses=ACCEPTED, response_model=objects.NamedEntities,
             summary="Find named entities with a fine-tuned NER model (extension)")
async def ner(
    body: NerRequest,
    request: Request,
    principal: Principal = Depends(inference_scope),
) -> Response:
    await check_serveable(principal, body.model, "ner")
    return await submit(request, principal, "/v1/ner", body.model, {"model": body.model, "input": body.inputs()})


@router.post("/v1/completions", responses=ACCEPTED, response_model=objects.Completion,
             summary="Complete prompts (OpenAI Completions)")
async def completions(
    body: CompletionRequest,
    request: Request,
    principal: Principal = Depends(inference_scope),
) -> Response:
    await check_serveable(principal, body.model, "generation")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    return await submit(request, principal, "/v1/completions", body.model,
                        {"model": body.model, "prompt": prompts, **body.sampling()})


@router.post("/v1/chat/completions", responses=ACCEPTED, response_model=objects.ChatCompletion,
             summary="Answer a conversation (OpenAI Chat Completions)")
async def chat_completions(
    body: ChatRequest,
    request: Request,
    principal: Principal = Depends(inference_scope),
) -> Response:
    await check_serveable(principal, body.model, "generation")
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    return await submit(request, principal, "/v1/chat/completions", body.model,
                        {"model": body.model, "messages": messages, **body.sampling()})


@router.get("/v1/inferences/{inference_id}", summary="Poll an online inference request (extension)",
            response_model=objects.Inference)
async def get_inference(inference_id: str, principal: Principal = Depends(inference_scope)) -> dict[str, Any]:
    return await read(serving.get_inference, tenant_id=principal.tenant_id, inference_id=inference_id)
