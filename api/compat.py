"""Seed-compatible routes: the request shapes of the articles LLM OS grew from, over the real endpoints.

Each route validates its own small body, then runs through the same path as its `/v1` twin (the same
inference queue, models, scopes and errors). Past the caller's `Prefer: wait=N` they answer 202 with the
inference handle, whose `response` (polled at `GET /v1/inferences/{id}`) has the `/v1` shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import Field, ValidationError

from api import objects
from api.deps import Principal, require
from api.errors import APIError
from api.fine_tuning import create, fine_tuning
from api.inference import ACCEPTED, check_serveable, submit
from api.schemas import CreateJob, Hyperparameters
from core.settings import get_settings
from domain.requests import Strict
from domain.serving import ZERO_SHOT

router = APIRouter(tags=["seed-compatible"])
inference_scope = require("inference")

_TEXT = Field(..., min_length=1, max_length=100_000)
_MODEL = Field(None, min_length=1, max_length=256)


class GenerateRequest(Strict):
    prompt: str = _TEXT
    max_length: int | None = Field(None, ge=1, le=4096, description="Tokens to generate at most (`max_tokens`).")
    temperature: float | None = Field(None, ge=0, le=2)
    model_name: str | None = _MODEL


class AskRequest(Strict):
    question: str = _TEXT
    context: str | None = Field(None, max_length=100_000)
    model_name: str | None = _MODEL


class TextRequest(Strict):
    text: str = _TEXT


class LlmServiceRequest(Strict):
    text: str | list[str]
    model: str | None = _MODEL


class MicromodelRequest(Strict):
    model: str = Field(..., min_length=1, max_length=256)
    task: str | None = Field(None, description="classification, ner or generation; read from the file when absent.")
    training_file: str = Field(..., min_length=1, max_length=64, description="A file id from `POST /v1/files`.")
    epochs: int | None = Field(None, description="`n_epochs`.")
    learning_rate: float | None = None


def _sampling(max_tokens: int | None, temperature: float | None) -> dict[str, Any]:
    return {"max_tokens": max_tokens or 64, "temperature": 1.0 if temperature is None else temperature,
            "top_p": 1.0, "n": 1, "stop": None, "seed": None}


@router.post("/generate", responses=ACCEPTED, response_model=objects.Generated,
             summary="Generate text from a prompt (seed-compatible)")
async def generate(
    body: GenerateRequest, request: Request, principal: Principal = Depends(inference_scope),
) -> Response:
    model = body.model_name or get_settings().default_generation_model
    await check_serveable(principal, model, "generation")
    payload = {"model": model, "prompt": [body.prompt], **_sampling(body.max_length, body.temperature)}
    return await submit(request, principal, "/v1/completions", model, payload,
                   lambda r: {"text": r["choices"][0]["text"]})


@router.post("/ask", responses=ACCEPTED, response_model=objects.Answer,
             summary="Answer a question, optionally from a context (seed-compatible)")
async def ask(
    body: AskRequest, request: Request, principal: Principal = Depends(inference_scope),
) -> Response:
    model = body.model_name or get_settings().default_generation_model
    await check_serveable(principal, model, "generation")
    messages = [{"role": "system", "content": "Answer the question briefly and accurately."}]
    question = f"Context: {body.context}\n\nQuestion: {body.question}" if body.context else body.question
    messages.append({"role": "user", "content": question})
    # Greedy: a question has one best answer, and repeated asks should agree.
    payload = {"model": model, "messages": messages, **_sampling(None, 0.0)}
    return await submit(request, principal, "/v1/chat/completions", model, payload,
                   lambda r: {"answer": r["choices"][0]["message"]["content"]})


# What the label routes answer without a fine-tuned classifier: zero-shot sentiment on the pretrained encoder.
ZERO_SHOT_MODEL = "minilm-l6"
ZERO_SHOT_LABELS = ["positive", "negative"]


async def _classify(
    request: Request, principal: Principal, model: str | None, texts: list[str], shape: Any
) -> Response:
    chosen = model or get_settings().default_classification_model
    payload: dict[str, Any] = {"model": chosen, "input": texts}
    try:
        await check_serveable(principal, chosen, "classification")
    except APIError as exc:
        if exc.code != "model_not_fine_tuned":
            if model is None:
                exc.message += "; set LLMOS_DEFAULT_CLASSIFICATION_MODEL to a fine-tuned classifier"
            raise
        # A base encoder has no trained head: a named one answers zero-shot sentiment itself; for the default
        # (tiny-bert out of the box, random weights) the pretrained MiniLM does, so the routes work untrained.
        chosen = chosen if model is not None else ZERO_SHOT_MODEL
        try:
            await check_serveable(principal, chosen, ZERO_SHOT)
        except APIError:
            if model is None:
                exc.message += "; set LLMOS_DEFAULT_CLASSIFICATION_MODEL to a fine-tuned classifier"
            raise exc from None
        payload = {"model": chosen, "input": texts, "labels": ZERO_SHOT_LABELS}
    return await submit(request, principal, "/v1/classifications", chosen, payload, shape)


@router.post("/api/llm", responses=ACCEPTED, response_model=objects.Prediction,
             summary="Label a text with the default classifier (seed-compatible)")
async def api_llm(
    body: TextRequest, request: Request, principal: Principal = Depends(inference_scope),
) -> Response:
    return await _classify(request, principal, None, [body.text],
                     lambda r: {"prediction": r["data"][0]["label"]})


@router.post("/llm-service", responses=ACCEPTED, response_model=objects.Predictions,
             summary="Label texts with per-label scores (seed-compatible)")
async def llm_service(
    body: LlmServiceRequest, request: Request, principal: Principal = Depends(inference_scope),
) -> Response:
    texts = [body.text] if isinstance(body.text, str) else body.text
    if not texts or len(texts) > 2048 or any(not t or len(t) > 100_000 for t in texts):
        raise APIError(400, "text: 1-2048 non-empty texts of at most 100000 characters", param="text")
    return await _classify(request, principal, body.model, texts,
                     lambda r: {"predictions": [{"label": d["label"], "score": d["score"], "scores": d["scores"]}
                                                for d in r["data"]]})


@router.post("/micromodel", status_code=202, summary="Fine-tune a small model (seed-compatible)",
             response_model=objects.FineTuningJob)
async def micromodel(body: MicromodelRequest, principal: Principal = Depends(fine_tuning)) -> dict[str, Any]:
    # Through CreateJob, so every rule and error of POST /v1/fine_tuning/jobs applies unchanged.
    try:
        job = CreateJob(model=body.model, training_file=body.training_file, task=body.task,
                        hyperparameters=Hyperparameters(n_epochs=body.epochs, learning_rate=body.learning_rate))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = {"n_epochs": "epochs"}.get(str(first["loc"][-1]), str(first["loc"][-1])) if first["loc"] else None
        raise APIError(400, f"{field}: {first['msg']}", param=field) from None
    return await create(job, principal)
