"""Inference request bodies, shared by the online routes (api/) and batch-line validation (tasks/).

Unknown fields are refused, not ignored; pydantic only, so workers import them without FastAPI.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
