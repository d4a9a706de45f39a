"""Request schemas of jobs and batches. Unknown fields are refused, not ignored.

Inference request bodies are in domain/requests.py: batch lines are validated with them on the workers.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from domain.requests import Strict
from training.hyperparameters import DpoHyperparameters, Hyperparameters

__all__ = ["CreateBatch", "CreateJob", "Hyperparameters"]

TASKS = ("classification", "ner", "generation")
# The contract's rule: it becomes part of a model ID (`ft:<base>:<tenant>:<suffix>:<job>`), whose ':'
# separators it must not contain, and stays readable in URLs and file names.
_SUFFIX = re.compile(r"^[a-z0-9-]{1,64}$")


class Supervised(Strict):
    hyperparameters: Hyperparameters | None = None


class Dpo(Strict):
    hyperparameters: DpoHyperparameters | None = None


class Method(Strict):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: Supervised | None = None
    dpo: Dpo | None = None

    @model_validator(mode="after")
    def _matches_type(self) -> Method:
        if self.type == "supervised" and self.dpo is not None:
            raise ValueError('"dpo" settings need type "dpo"')
        if self.type == "dpo" and self.supervised is not None:
            raise ValueError('"supervised" settings need type "supervised"')
        return self


class Compute(Strict):
    """What one job trains on (extension): `processes` data-parallel ranks on one node, one GPU each on GPUs."""

    processes: int = Field(1, ge=1, le=64, description="torch.distributed processes the job trains with; only a "
                           "worker offering as many (LLMOS_WORKER_PROCESSES) runs it.")


class Mlflow(Strict):
    """Where the job's run goes: an MLflow tracking server (or a local store the operator allows)."""

    tracking_uri: str = Field(..., min_length=1, max_length=2048, description="http(s) URI of a tracking "
                              "server, or sqlite:///… under the server's LLMOS_MLFLOW_LOCAL_ROOT.")
    experiment: str = Field("llmos", min_length=1, max_length=256, description="Created when missing.")
    run_name: str | None = Field(None, max_length=256, description="Default: the job's ID.")
    tags: dict[str, str] | None = Field(None, description="At most 16, added to the run's tags.")

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (len(v) > 16 or any(len(k) > 250 or len(x) > 5000 for k, x in v.items())):
            raise ValueError("at most 16 tags, keys of up to 250 characters, values of up to 5000")
        return v


class Integration(Strict):
    """OpenAI's `integrations` entry, with the `mlflow` type (metrics, hyperparameters and the final model)."""

    type: Literal["mlflow"]
    mlflow: Mlflow


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
    priority: int | None = Field(None, ge=-10, le=10, description="Order among this tenant's own waiting jobs; "
                                 "higher first (default 0).")
    compute: Compute | None = None
    integrations: list[Integration] | None = Field(None, max_length=4)

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None and not _SUFFIX.match(v):
            raise ValueError("must be 1-64 characters of lowercase letters, digits and '-'")
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
        if self.method and self.method.type == "dpo":
            # A stored `beta` is what marks the job as DPO (training.hyperparameters.method_of).
            dpo = (self.method.dpo.hyperparameters if self.method.dpo else None) or DpoHyperparameters()
            if self.hyperparameters is not None:
                dpo = DpoHyperparameters(**{**self.hyperparameters.requested(), **dpo.model_dump(exclude_none=True)})
            return dpo.requested()
        chosen = self.hyperparameters
        if chosen is None and self.method and self.method.supervised:
            chosen = self.method.supervised.hyperparameters
        return chosen.requested() if chosen else {}


class CreateBatch(Strict):
    """`POST /v1/batches`: run every line of an uploaded ``batch`` file against one endpoint."""

    input_file_id: str = Field(..., min_length=1, max_length=64, description="A file uploaded with purpose batch.")
    endpoint: Literal["/v1/completions", "/v1/chat/completions", "/v1/classifications", "/v1/ner",
                      "/v1/embeddings"]
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
