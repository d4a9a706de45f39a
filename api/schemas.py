"""Request schemas, apart from the ORM models. Unknown fields are refused, not ignored."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TASKS = ("classification", "ner", "generation")
Auto = Literal["auto"]
_SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        # Postgres text and JSONB cannot hold NUL; refuse it as bad input instead of failing on insert.
        if _has_nul(data):
            raise ValueError("strings must not contain NUL (0x00) characters")
        return data


class Hyperparameters(Strict):
    n_epochs: int | Auto | None = Field(None, description="Passes over the training data (1-100).")
    batch_size: int | Auto | None = Field(None, description="Examples per step (1-1024).")
    learning_rate_multiplier: float | Auto | None = Field(None, description="Scales the task's base rate.")
    learning_rate: float | None = Field(None, description="Absolute learning rate; wins over the multiplier.")
    max_seq_length: int | None = Field(None, description="Tokens per example after truncation (8-8192).")
    warmup_ratio: float | None = Field(None, description="Share of steps with a rising learning rate.")
    lora: bool | dict[str, Any] | None = Field(None, description="LoRA adapter instead of full fine-tuning.")
    max_runtime_seconds: int | None = Field(
        None, ge=1, le=30 * 24 * 3600,
        description="Training time after which the job checkpoints and fails (extension; default from settings).",
    )

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and not 1 <= v <= 100:
            raise ValueError("must be between 1 and 100")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError("must be between 1 and 1024")
        return v

    @field_validator("learning_rate_multiplier", "learning_rate")
    @classmethod
    def _positive(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float | int) and not 0 < v <= 100:
            raise ValueError("must be greater than 0 and at most 100")
        return v

    @field_validator("max_seq_length")
    @classmethod
    def _seq(cls, v: int | None) -> int | None:
        if v is not None and not 8 <= v <= 8192:
            raise ValueError("must be between 8 and 8192")
        return v

    @field_validator("warmup_ratio")
    @classmethod
    def _warmup(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v < 1:
            raise ValueError("must be at least 0 and below 1")
        return v


class Supervised(Strict):
    hyperparameters: Hyperparameters | None = None


class Method(Strict):
    type: Literal["supervised"] = "supervised"
    supervised: Supervised | None = None


class CreateJob(Strict):
    model: str = Field(..., min_length=1, max_length=256)
    training_file: str = Field(..., min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    task: Literal["classification", "ner", "generation"] | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    webhook_url: str | None = Field(None, max_length=2048)
    priority: int | None = Field(None, ge=-100, le=100)

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None and not _SUFFIX.match(v):
            raise ValueError("must be 1-40 characters of letters, digits, '-' or '_'")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 keys")
        for key, value in v.items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError("keys are at most 64 characters and values at most 512")
        return v

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("must be an http(s) URL")
        return v

    def resolved_hyperparameters(self) -> dict[str, Any]:
        chosen = self.hyperparameters
        if chosen is None and self.method and self.method.supervised:
            chosen = self.method.supervised.hyperparameters
        return chosen.model_dump(exclude_none=True) if chosen else {}


class ClassificationRequest(Strict):
    model: str = Field(..., min_length=1, max_length=256)
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("must not be empty")
        if len(items) > 2048:
            raise ValueError("at most 2048 inputs per request")
        if any(len(s) > 100_000 for s in items):
            raise ValueError("each input is at most 100000 characters")
        return v


class NerRequest(ClassificationRequest):
    """`POST /v1/ner`: the same input shape as classifications."""


def _stop_list(v: str | list[str] | None) -> str | list[str] | None:
    items = [v] if isinstance(v, str) else (v or [])
    if len(items) > 4 or any(not s or len(s) > 256 for s in items):
        raise ValueError("at most 4 non-empty stop sequences of up to 256 characters")
    return v


class SamplingFields(Strict):
    max_tokens: int | None = Field(None, ge=1, le=4096, description="Tokens to generate at most.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool | None = Field(None, description="Streaming is not offered; false or absent.")
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility.")
    presence_penalty: float | None = Field(None, description="Accepted for compatibility; must be 0 or absent.")
    frequency_penalty: float | None = Field(None, description="Accepted for compatibility; must be 0 or absent.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        return _stop_list(v)

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("streaming responses are not offered; omit stream or set it to false")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported; omit them or send 0")
        return v

    def sampling(self) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        temperature = 1.0 if self.temperature is None else self.temperature
        return {"max_tokens": self.max_tokens or 16, "temperature": temperature, "top_p": self.top_p or 1.0,
                "n": self.n or 1, "stop": stop or None, "seed": self.seed}


class CompletionRequest(SamplingFields):
    model: str = Field(..., min_length=1, max_length=256)
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or len(items) > 64 or any(len(p) > 100_000 for p in items):
            raise ValueError("1-64 prompts of at most 100000 characters")
        return v


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=100_000)
    name: str | None = Field(None, max_length=64)


class ChatRequest(SamplingFields):
    model: str = Field(..., min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)

    def sampling(self) -> dict[str, Any]:
        result = super().sampling()
        if self.max_completion_tokens and not self.max_tokens:
            result["max_tokens"] = self.max_completion_tokens
        return result


class CreateBatch(Strict):
    """`POST /v1/batches`: run every line of an uploaded ``batch`` file against one endpoint."""

    input_file_id: str = Field(..., min_length=1, max_length=64, description="A file uploaded with purpose batch.")
    endpoint: Literal["/v1/completions", "/v1/chat/completions", "/v1/classifications", "/v1/ner"]
    completion_window: Literal["24h"] = Field(..., description="Only 24h is offered.")
    metadata: dict[str, str] | None = None
    webhook_url: str | None = Field(None, max_length=2048, description="Receives this batch's events.")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("at most 16 keys of up to 64 characters, values of up to 512")
        return v

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("must be an http(s) URL")
        return v
