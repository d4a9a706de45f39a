"""The hyperparameters a job may ask for, and their limits: one definition for the API and for training.

The API validates a request with `Hyperparameters` (a 400 naming the field); training resolves "auto" and
absent values within the same `LIMITS`. Imports only pydantic, so the API process never loads torch for it.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class Limit(NamedTuple):
    low: float
    high: float
    low_inclusive: bool = True

    def check(self, name: str, value: float) -> None:
        """Raise ValueError naming ``name`` when ``value`` lies outside the limit."""
        above_low = value >= self.low if self.low_inclusive else value > self.low
        if above_low and value <= self.high:
            return
        if isinstance(value, int) and self.low_inclusive and float(self.low).is_integer():
            raise ValueError(f"{name} must be between {int(self.low)} and {int(self.high)}, got {value}")
        bound = "at least" if self.low_inclusive else "greater than"
        raise ValueError(f"{name} must be {bound} {self.low} and at most {self.high}, got {value}")


LIMITS: dict[str, Limit] = {
    "n_epochs": Limit(1, 100),
    "batch_size": Limit(1, 1024),
    "learning_rate": Limit(0.0, 1.0, low_inclusive=False),
    "learning_rate_multiplier": Limit(0.0, 100.0, low_inclusive=False),
    "max_seq_length": Limit(8, 8192),
    "warmup_ratio": Limit(0.0, 0.5),
    "weight_decay": Limit(0.0, 1.0),
    "max_runtime_seconds": Limit(1, 30 * 24 * 3600),
}
# DPO's alone, so apart from the limits every task resolves.
BETA_LIMIT = Limit(0.0, 10.0, low_inclusive=False)

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    """What a job may ask for; "auto" or absent values are chosen from the data when its files are validated."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto | None = Field(None, description="Passes over the training data (1-100).")
    batch_size: int | Auto | None = Field(None, description="Examples per step (1-1024).")
    learning_rate_multiplier: float | Auto | None = Field(
        None, description="Scales the task's base learning rate (above 0, at most 100).")
    learning_rate: float | Auto | None = Field(
        None, description="Absolute learning rate (above 0, at most 1); wins over the multiplier.")
    max_seq_length: int | Auto | None = Field(None, description="Tokens per example after truncation (8-8192).")
    warmup_ratio: float | Auto | None = Field(None, description="Share of steps with a rising learning rate (0-0.5).")
    weight_decay: float | Auto | None = Field(None, description="AdamW weight decay (0-1).")
    lora: bool | dict[str, Any] | None = Field(None, description="LoRA adapter instead of full fine-tuning.")
    max_runtime_seconds: int | None = Field(
        None, description="Training time after which the job checkpoints and fails (extension; default from "
                          "settings).")

    @field_validator("n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate", "max_seq_length",
                     "warmup_ratio", "weight_decay", "max_runtime_seconds")
    @classmethod
    def _within_limits(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            assert info.field_name is not None
            try:
                LIMITS[info.field_name].check(info.field_name, value)
            except ValueError as exc:
                # pydantic names the field itself; the message keeps only the bound.
                raise ValueError(str(exc).removeprefix(f"{info.field_name} ")) from None
        return value

    def requested(self) -> dict[str, Any]:
        """The values given, as stored on the job before resolution."""
        return self.model_dump(exclude_none=True)


class DpoHyperparameters(Hyperparameters):
    """`method.dpo.hyperparameters`: the supervised ones plus DPO's `beta`; a stored `beta` marks a DPO job."""

    beta: float | Auto | None = Field(
        None, description="How far the policy may move from the reference model (above 0, at most 10); "
                          "lower lets it move further.")

    @field_validator("beta")
    @classmethod
    def _beta_within_limits(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                BETA_LIMIT.check("beta", value)
            except ValueError as exc:
                raise ValueError(str(exc).removeprefix("beta ")) from None
        return value

    def requested(self) -> dict[str, Any]:
        # "auto" rather than absent, so the stored hyperparameters always say the job is DPO.
        return {**super().requested(), "beta": "auto" if self.beta is None else self.beta}


def method_of(hyperparameters: dict[str, Any]) -> str:
    """"dpo" for a job whose hyperparameters carry `beta`, otherwise "supervised"."""
    return "dpo" if "beta" in hyperparameters else "supervised"
