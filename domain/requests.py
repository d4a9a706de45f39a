"""Inference request bodies, shared by the online routes (api/) and batch-line validation (tasks/).

Unknown fields are refused, not ignored; pydantic only, so workers import them without FastAPI.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from core.settings import get_settings

# The compute one request may ask for (the contract's bounds): each beyond is a 400 naming the field.
MAX_INPUTS = 256
MAX_INPUT_CHARS = 100_000
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64


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


def _text_inputs(v: str | list[str]) -> str | list[str]:
    """One text or a list of 1..MAX_INPUTS texts of at most MAX_INPUT_CHARS each."""
    items = [v] if isinstance(v, str) else v
    if not items:
        raise ValueError("must not be empty")
    if len(items) > MAX_INPUTS:
        raise ValueError(f"at most {MAX_INPUTS} inputs per request, not {len(items)}")
    for index, text in enumerate(items):
        if len(text) > MAX_INPUT_CHARS:
            raise ValueError(f"each input is at most {MAX_INPUT_CHARS} characters; input {index} has {len(text)}")
    return v


class TextInputs(Strict):
    model: str = Field(..., min_length=1, max_length=256)
    input: str | list[str]

    @field_validator("input", mode="before")
    @classmethod
    def _texts_only(cls, v: Any) -> Any:
        # OpenAI's embeddings accept token ID arrays too; the models here read text, so say so plainly
        # instead of pydantic's union error about every member type.
        if isinstance(v, list) and any(isinstance(x, int | list) for x in v):
            raise ValueError("token ID arrays are not accepted; send the text itself (a string or a list of strings)")
        return v

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> str | list[str]:
        return _text_inputs(v)

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


MIN_LABELS = 2
MAX_LABELS = 64
MAX_LABEL_CHARS = 256


class ClassificationRequest(TextInputs):
    """`POST /v1/classifications`: a fine-tuned classifier's labels, or zero-shot ones given in `labels`."""

    labels: list[str] | None = Field(
        None, description=f"Zero-shot: {MIN_LABELS}-{MAX_LABELS} candidate labels, scored by an encoder model.")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not MIN_LABELS <= len(v) <= MAX_LABELS:
            raise ValueError(f"give {MIN_LABELS}-{MAX_LABELS} labels, not {len(v)}")
        if any(not label.strip() or len(label) > MAX_LABEL_CHARS for label in v):
            raise ValueError(f"each label is a non-blank string of at most {MAX_LABEL_CHARS} characters")
        if len(set(v)) != len(v):
            raise ValueError("labels must be distinct")
        return v

    def payload(self) -> dict[str, Any]:
        """What the inference worker gets: labels only when asked for zero-shot."""
        payload: dict[str, Any] = {"model": self.model, "input": self.inputs()}
        if self.labels is not None:
            payload["labels"] = list(self.labels)
        return payload


class NerRequest(TextInputs):
    """`POST /v1/ner`: the same input shape as classifications."""


class EmbeddingRequest(TextInputs):
    """`POST /v1/embeddings`, OpenAI's shape."""

    encoding_format: Literal["float", "base64"] | None = Field(
        None, description="float (default) or base64: the little-endian float32 bytes, base64-encoded.")
    dimensions: int | None = Field(None, ge=1, description="Keep the first N components, re-normalised.")
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility.")

    def payload(self) -> dict[str, Any]:
        return {"model": self.model, "input": self.inputs(), "encoding_format": self.encoding_format or "float",
                "dimensions": self.dimensions}


def _stop_list(v: str | list[str] | None) -> str | list[str] | None:
    items = [v] if isinstance(v, str) else (v or [])
    if len(items) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_CHARS for s in items):
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} non-empty stop sequences of up to {MAX_STOP_CHARS} characters")
    return v


def _field_error(model: str, field: str, message: str, value: Any) -> ValidationError:
    """A validation error located at ``field``, raised from a check that needs several fields."""
    return ValidationError.from_exception_data(model, [InitErrorDetails(
        type=PydanticCustomError("request_too_costly", message), loc=(field,), input=value)])


def _check_budget(model: str, prompts: int, sampling: dict[str, Any], field: str) -> None:
    """Prompts x n x max_tokens within `LLMOS_MAX_REQUEST_TOKENS`: the tokens one request may generate."""
    cap = get_settings().max_request_tokens
    total = prompts * sampling["n"] * sampling["max_tokens"]
    if total > cap:
        raise _field_error(model, field, f"asks for {total} tokens ({prompts} prompts x n={sampling['n']} x "
                           f"{field}={sampling['max_tokens']}); a request may ask for at most {cap}",
                           sampling["max_tokens"])


class StreamOptions(Strict):
    include_usage: bool | None = Field(None, description="A last chunk, before `[DONE]`, carries the usage.")


class SamplingFields(Strict):
    max_tokens: int | None = Field(None, ge=1, le=4096, description="Tokens to generate at most.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool | None = Field(None, description="Send the answer as it is generated, as server-sent events in "
                                                  "OpenAI's chunk shape, ending with `data: [DONE]`. Ignored in "
                                                  "batch files, whose output lines hold whole answers.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility.")
    presence_penalty: float | None = Field(None, description="Accepted for compatibility; must be 0 or absent.")
    frequency_penalty: float | None = Field(None, description="Accepted for compatibility; must be 0 or absent.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        return _stop_list(v)

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

    def streaming(self) -> dict[str, Any]:
        """The payload's streaming fields, only when streamed: stored requests otherwise keep their shape."""
        if not self.stream:
            return {}
        return {"stream": True, "include_usage": bool(self.stream_options and self.stream_options.include_usage)}


class CompletionRequest(SamplingFields):
    model: str = Field(..., min_length=1, max_length=256)
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or len(items) > 64 or any(len(p) > MAX_INPUT_CHARS for p in items):
            raise ValueError(f"1-64 prompts of at most {MAX_INPUT_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _budget(self) -> CompletionRequest:
        _check_budget("CompletionRequest", 1 if isinstance(self.prompt, str) else len(self.prompt), self.sampling(),
                      "max_tokens")
        return self


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

    @model_validator(mode="after")
    def _budget(self) -> ChatRequest:
        field = "max_completion_tokens" if self.max_completion_tokens and not self.max_tokens else "max_tokens"
        _check_budget("ChatRequest", 1, self.sampling(), field)
        return self


# Rate limits count tokens before the model has seen the request: about four characters a token (OpenAI's
# rule of thumb for English), plus every token a generation may produce; the count is corrected once the
# answer's `usage` is known.
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4


def _text_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def estimated_tokens(endpoint: str, payload: dict[str, Any]) -> int:
    """What a request may cost against the tenant's tokens per minute: its input, plus its whole output budget."""
    if endpoint == "/v1/completions":
        prompts = payload["prompt"]
        return sum(_text_tokens(p) for p in prompts) + len(prompts) * payload["n"] * payload["max_tokens"]
    if endpoint == "/v1/chat/completions":
        messages = payload["messages"]
        return (sum(_text_tokens(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in messages)
                + payload["n"] * payload["max_tokens"])
    # Zero-shot labels go through the model too, once each per request, as a short prompt.
    labels = payload.get("labels") or []
    return (sum(_text_tokens(text) for text in payload["input"])
            + sum(_text_tokens(label) + MESSAGE_OVERHEAD_TOKENS for label in labels))
