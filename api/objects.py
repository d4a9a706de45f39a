"""Response models: the shape of every 2xx body, so `/openapi.json` documents it and clients can rely on it.

FastAPI validates each route's return value against its model and serialises it in Rust (pydantic-core),
which is also the fastest way to write these bodies. Unknown extra keys are never dropped silently: the
models list every field the services' objects carry.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

JSONObject = dict[str, Any]


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListOf(Shape, Generic[T]):
    """OpenAI's list shape: newest first, `has_more` when another page follows."""

    object: Literal["list"]
    data: list[T]
    has_more: bool


class JobError(Shape):
    code: str | None
    message: str
    param: str | None


class Compute(Shape):
    processes: int = Field(description="Data-parallel training processes the job runs as (extension).")


class FineTuningJob(Shape):
    id: str
    object: Literal["fine_tuning.job"]
    created_at: int
    model: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "cancelling",
                    "paused"]
    task: Literal["classification", "ner", "generation"] | None
    training_file: str
    validation_file: str | None
    hyperparameters: JSONObject
    method: JSONObject
    fine_tuned_model: str | None
    organization_id: str
    finished_at: int | None
    estimated_finish: int | None
    error: JobError | None
    result_files: list[str]
    trained_tokens: int | None
    seed: int
    metadata: dict[str, str] | None
    user_provided_suffix: str | None
    integrations: list[JSONObject]
    progress: JSONObject | None
    metrics: JSONObject | None
    attempts: int
    webhook_url: str | None
    priority: int
    queue_position: int | None
    compute: Compute


class JobEvent(Shape):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: Literal["info", "warn", "error"]
    type: Literal["message", "metrics"]
    message: str
    data: JSONObject | None


class Checkpoint(Shape):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: JSONObject
    fine_tuning_job_id: str


class Deleted(Shape):
    id: str
    object: str
    deleted: bool


class WebhookEndpoint(Shape):
    id: str
    object: Literal["webhook_endpoint"]
    url: str
    events: list[str]
    description: str | None
    status: Literal["enabled", "disabled"]
    created_at: int
    updated_at: int


class WebhookEndpointWithSecret(WebhookEndpoint):
    """Only where the secret is shown: at creation and rotation."""

    secret: str


class Secret(Shape):
    secret: str


class Event(Shape):
    id: str
    object: Literal["event"]
    created_at: int
    type: str
    data: JSONObject


class Redelivered(Event):
    redelivered_to: int


class DeliveryAttempt(Shape):
    object: Literal["webhook.delivery_attempt"]
    endpoint: str | None
    url: str
    attempt: int
    status_code: int | None
    duration_ms: int | None
    response_excerpt: str | None
    error: str | None
    created_at: int


class RequestCounts(Shape):
    total: int
    completed: int
    failed: int


class Batch(Shape):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: JSONObject | None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    webhook_url: str | None


class File(Shape):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"]
    status_details: str | None
    expires_at: int | None


class Model(Shape):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: Literal["base", "fine-tuned", "checkpoint"]
    tasks: list[str]
    architecture: str | None
    base_model: str | None
    fine_tuning_job: str | None
    description: str | None


class Inference(Shape):
    id: str
    object: Literal["inference"]
    status: Literal["queued", "running", "succeeded", "failed"]
    endpoint: str
    model: str
    created_at: int
    finished_at: int | None
    response: JSONObject | None
    error: JSONObject | None


class Usage(Shape):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(Shape):
    text: str
    index: int
    logprobs: None
    finish_reason: Literal["stop", "length"]


class Completion(Shape):
    """OpenAI's ``text_completion``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None


class ChatMessage(Shape):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatChoice(Shape):
    index: int
    message: ChatMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(Shape):
    """OpenAI's ``chat.completion``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None


class Label(Shape):
    index: int
    label: str
    score: float
    scores: dict[str, float]


class Classifications(Shape):
    object: Literal["list"]
    model: str
    data: list[Label]


class Embedding(Shape):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # base64: the little-endian float32 bytes


class EmbeddingUsage(Shape):
    prompt_tokens: int
    total_tokens: int


class Embeddings(Shape):
    """OpenAI's embeddings response."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Entity(Shape):
    entity_group: str
    text: str
    start: int
    end: int
    score: float


class Entities(Shape):
    index: int
    entities: list[Entity]


class NamedEntities(Shape):
    object: Literal["list"]
    model: str
    data: list[Entities]


class Generated(Shape):
    text: str


class Answer(Shape):
    answer: str


class Prediction(Shape):
    prediction: str


class Predictions(Shape):
    predictions: list[JSONObject]


class Limits(Shape):
    """`GET /v1/limits`: each limit in force (null: unlimited) beside what the tenant uses of it."""

    object: Literal["limits"]
    rpm: int | None
    tpm: int | None
    max_active_jobs: int | None
    active_jobs: int
    max_storage_bytes: int | None
    storage_bytes: int
    max_webhook_endpoints: int | None
    webhook_endpoints: int
    max_active_batches: int | None
    active_batches: int
    weight: float


class Readiness(Shape):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]
