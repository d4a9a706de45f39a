"""Online inference: the API hands each request to an inference worker and waits for its answer."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import orjson
import redis
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from api import objects
from api.boundary import read, read_rows
from api.deps import Principal, charge, require
from api.errors import APIError, JSONBody
from core import ids
from core.clock import unix, utcnow
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
    new = await _enqueue(principal, endpoint, model, payload)
    inference_id, wait = new.id, _wait_seconds(request)
    if wait <= 0:
        # Submit, then poll (`Prefer: wait=0`): the handle as sent, without reading the row back. Reading it
        # would cost a query per submission and answer 200 or 202 depending on how fast the worker was.
        return None, {"id": inference_id, "object": "inference", "status": "queued", "endpoint": endpoint,
                      "model": model, "created_at": unix(new.created_at), "finished_at": None, "response": None,
                      "error": None}
    try:
        reply = await replies.wait_reply_async(inference_id, wait)
    except redis.RedisError:
        # The request is queued; only the fast path is gone. The caller polls the row instead.
        log.warning("reply channel of %s unavailable; answering with the handle", inference_id)
        reply = None
    if reply is None:
        reply, row = await _reply_in_row(principal, inference_id)
        if reply is None:
            return None, row
    _raise_failure(reply)
    response: dict[str, Any] = reply["response"]
    return response, {}


async def _reply_in_row(principal: Principal, inference_id: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the answer, the inference object) from the request's row; the answer is None while it is unfinished."""
    row = await read(serving.get_inference, tenant_id=principal.tenant_id, inference_id=inference_id)
    if row["status"] not in ("succeeded", "failed"):
        return None, row
    return {"status": row["status"], "response": row["response"], "error": row["error"]}, row


async def _enqueue(principal: Principal, endpoint: str, model: str, payload: dict[str, Any]
                   ) -> inferences.NewRequest:
    """Persist the request and send it to the inference queue (503 when the broker is down)."""
    new = inferences.NewRequest(ids.new_id(ids.INFERENCE), principal.tenant_id, endpoint, model, payload, utcnow())
    if not await SENDS.send(new):
        raise APIError(503, BROKER_DOWN, type_="server_error", code="broker_unavailable", headers={"Retry-After": "5"})
    return new


def _raise_failure(reply: dict[str, Any]) -> None:
    """The APIError of a failed inference's reply (none for a success)."""
    if reply["status"] == "failed":
        err = reply["error"] or {}
        raise APIError(int(err.get("status", 500)), err.get("message", "inference failed"),
                       type_=err.get("type", "server_error"), param=err.get("param"), code=err.get("code"))


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
    if payload.get("stream"):
        return await stream(request, principal, endpoint, model, payload)
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


# Documented on the generation routes: what `stream: true` answers instead of the JSON body.
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "With `stream: true`: server-sent events, one `data:` line per chunk in OpenAI's shape "
                         "(`text_completion` or `chat.completion.chunk`), then `data: [DONE]`."},
    **ACCEPTED,
}


async def stream(request: Request, principal: Principal, endpoint: str, model: str, payload: dict[str, Any]
                 ) -> Response:
    """A generation request answered as server-sent events, chunk by chunk as its text grows.

    The worker pushes each decode step's new text to the request's stream list and then, as for any request,
    writes the whole answer to its row and reply list. Errors known before the first chunk (a prompt too long
    for the model, an unknown model) answer with their HTTP status like an unstreamed request; a request that
    has not started within the caller's wait answers 202 with the handle to poll.
    """
    estimate = estimated_tokens(endpoint, payload)
    await charge(request, principal.tenant_id, "tpm", principal.tpm, estimate)
    inference_id = (await _enqueue(principal, endpoint, model, payload)).id
    wait = _wait_seconds(request)
    first = await _next_streamed(inference_id, wait)
    if first is None:
        reply, row = await _reply_in_row(principal, inference_id)
        if reply is None:
            return JSONBody(row, status_code=202)
        first = ("reply", reply)
    if first[0] == "reply":
        _raise_failure(first[1])
    chunks = Chunks(endpoint, inference_id, model, bool(payload.get("include_usage")))

    async def events() -> AsyncIterator[bytes]:
        item: tuple[str, dict[str, Any]] | None = first
        while item is not None:
            kind, data = item
            if kind == "chunk":
                yield chunks.text(data["index"], data["text"], data.get("finish_reason"))
            else:
                if data["status"] == "failed":
                    yield _sse({"error": data["error"]})
                    break
                response = data["response"]
                for event in chunks.rest(response):
                    yield event
                used = (response.get("usage") or {}).get("total_tokens")
                if principal.tpm is not None and isinstance(used, int):
                    await ratelimit.adjust(principal.tenant_id, "tpm", principal.tpm, used - estimate)
                break
            # Between chunks the caller's wait bounds a stall (a lost worker, say): the answer, if it comes
            # later, is in the inference's row.
            item = await _next_streamed(inference_id, wait)
            if item is None:
                yield _sse({"error": {"message": f"no progress for {wait:g} s; poll GET /v1/inferences/"
                                                 f"{inference_id} for the answer", "type": "server_error",
                                      "code": "stream_stalled", "param": None}})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      "x-llmos-inference-id": inference_id})


async def _next_streamed(inference_id: str, wait: float) -> tuple[str, dict[str, Any]] | None:
    try:
        return await replies.next_streamed(inference_id, wait)
    except redis.RedisError:
        log.warning("stream channel of %s unavailable", inference_id)
        return None


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class Chunks:
    """One streamed answer's SSE events, in OpenAI's chunk shapes, keeping what each choice has been sent."""

    def __init__(self, endpoint: str, inference_id: str, model: str, include_usage: bool) -> None:
        self.chat = endpoint == "/v1/chat/completions"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{inference_id}"
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.sent: dict[int, str] = {}
        self.finished: set[int] = set()

    def text(self, index: int, text: str, finish_reason: str | None = None) -> bytes:
        first = index not in self.sent
        self.sent[index] = self.sent.get(index, "") + text
        if finish_reason is not None:
            self.finished.add(index)
        if not self.chat:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
            return _sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                         "choices": [choice], "system_fingerprint": None})
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                     "system_fingerprint": None,
                     "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    def rest(self, response: dict[str, Any]) -> list[bytes]:
        """What the whole answer holds that the chunks did not carry (chunks lost on the way, a finish
        reason), then the usage chunk when asked for."""
        events = []
        for choice in response["choices"]:
            index = choice["index"]
            text = choice["message"]["content"] if self.chat else choice["text"]
            sent = self.sent.get(index, "")
            missing = text[len(sent):] if text.startswith(sent) else ""
            if missing or index not in self.finished:
                events.append(self.text(index, missing, choice["finish_reason"]))
        if self.include_usage:
            events.append(_sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                                "created": self.created, "model": self.model, "system_fingerprint": None,
                                "choices": [], "usage": response["usage"]}))
        return events


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


@router.post("/v1/completions", responses=STREAMED, response_model=objects.Completion,
             summary="Complete prompts (OpenAI Completions)")
async def completions(
    body: CompletionRequest,
    request: Request,
    principal: Principal = Depends(inference_scope),
) -> Response:
    await check_serveable(principal, body.model, "generation")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    return await submit(request, principal, "/v1/completions", body.model,
                        {"model": body.model, "prompt": prompts, **body.sampling(), **body.streaming()})


@router.post("/v1/chat/completions", responses=STREAMED, response_model=objects.ChatCompletion,
             summary="Answer a conversation (OpenAI Chat Completions)")
async def chat_completions(
    body: ChatRequest,
    request: Request,
    principal: Principal = Depends(inference_scope),
) -> Response:
    await check_serveable(principal, body.model, "generation")
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    return await submit(request, principal, "/v1/chat/completions", body.model,
                        {"model": body.model, "messages": messages, **body.sampling(), **body.streaming()})


@router.get("/v1/inferences/{inference_id}", summary="Poll an online inference request (extension)",
            response_model=objects.Inference)
async def get_inference(inference_id: str, principal: Principal = Depends(inference_scope)) -> dict[str, Any]:
    return await read(serving.get_inference, tenant_id=principal.tenant_id, inference_id=inference_id)
