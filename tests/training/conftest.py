"""Shared fixtures for the training tests: offline base models built once per session."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

# Nothing here may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from training.base_models import BaseModelInfo, ensure_base_models
from training.callbacks import StepState, StopReason
from training.devices import configure_cpu

# Tiny models gain nothing from threads, and spinning threads crawl on a busy machine.
configure_cpu(1)

POSITIVE = ["great", "lovely", "good", "wonderful", "excellent", "tasty"]
NEGATIVE = ["awful", "bad", "terrible", "horrible", "disgusting", "bland"]
SUBJECTS = ["the food", "the meal", "the soup", "the pasta", "the coffee", "the dinner", "the service"]


def sentiment_rows(n: int, seed: int, int_labels: bool = False) -> list[dict[str, Any]]:
    """Easy, separable rows: "<subject> was <positive|negative word>"."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 1
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        label: str | int = int(positive) if int_labels else ("positive" if positive else "negative")
        rows.append({"text": f"{rng.choice(SUBJECTS)} was {word}", "label": label})
    return rows


def assert_same_weights(left_dir: Path, right_dir: Path) -> None:
    """Two saved models hold the same tensors (to float rounding): what an exact resume must give."""
    import torch
    from safetensors.torch import load_file

    left = load_file(left_dir / "model.safetensors")
    right = load_file(right_dir / "model.safetensors")
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert torch.allclose(tensor, right[name], atol=1e-6, rtol=1e-5), name


class Recorder:
    """Callbacks that record every call and can ask to stop at a given step."""

    def __init__(self, stop_at: int | None = None, reason: StopReason = "pause") -> None:
        self.stop_at = stop_at
        self.reason: StopReason = reason
        self.steps: list[StepState] = []
        self.evaluations: list[tuple[int, float, dict[str, float]]] = []
        self.logs: list[tuple[int, float, dict[str, float]]] = []
        self.checkpoints: list[tuple[int, Path, dict[str, Any]]] = []

    def on_step(self, state: StepState) -> None:
        self.steps.append(state)

    def on_log(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        self.logs.append((step, epoch, metrics))

    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        self.evaluations.append((step, epoch, metrics))

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        self.checkpoints.append((step, path, metrics))

    def should_stop(self) -> StopReason | None:
        done = self.steps[-1].step if self.steps else 0
        return self.reason if self.stop_at is not None and done >= self.stop_at else None


@pytest.fixture(scope="session")
def base_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BaseModelInfo]:
    models_dir = tmp_path_factory.mktemp("base_models")
    return {info.name: info for info in ensure_base_models(models_dir)}


@pytest.fixture(scope="session")
def tiny_bert(base_models: dict[str, BaseModelInfo]) -> Path:
    return base_models["tiny-bert"].path
