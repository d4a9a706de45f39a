"""Stop, checkpoint and resume: a paused-then-resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from tests.training.conftest import Recorder, sentiment_rows
from training.callbacks import NullCallbacks, StopReason
from training.classification import (
    ClassificationResult,
    ClassificationSpec,
    resolve_hyperparameters,
    train_classification,
)
from training.trainer import TrainArgs, latest_checkpoint, run_training

# 60 training rows in batches of 8: 8 steps per epoch, 24 in all.
HP = {"learning_rate": 3e-3, "n_epochs": 3, "batch_size": 8}
CHECKPOINT_FILES = {"config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"}


def make_spec(tiny_bert: Path, work: Path) -> ClassificationSpec:
    return ClassificationSpec(
        base_model_dir=tiny_bert,
        output_dir=work / "model",
        checkpoint_dir=work / "checkpoints",
        train_rows=sentiment_rows(80, seed=5, int_labels=True),
        eval_rows=None,
        hyperparameters=resolve_hyperparameters(HP, 80),
        seed=11,
        eval_fraction=0.25,
    )


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert torch.allclose(tensor, right[name], atol=1e-6, rtol=1e-5), name


@pytest.fixture(scope="module")
def reference(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> ClassificationResult:
    return train_classification(make_spec(tiny_bert, tmp_path_factory.mktemp("reference")), NullCallbacks())


def test_integer_labels_are_stringified(reference: ClassificationResult) -> None:
    assert reference.outcome.completed and reference.model_dir is not None
    assert reference.labels == ["0", "1"]
    assert AutoConfig.from_pretrained(reference.model_dir).id2label == {0: "0", 1: "1"}
    assert set(reference.report) == {"0", "1"}


@pytest.mark.parametrize(("stop_at", "reason"), [(11, "pause"), (8, "shutdown")])
def test_stop_then_resume_matches_uninterrupted_run(
    tiny_bert: Path, tmp_path: Path, reference: ClassificationResult, stop_at: int, reason: StopReason
) -> None:
    spec = make_spec(tiny_bert, tmp_path)
    first = Recorder(stop_at=stop_at, reason=reason)
    stopped = train_classification(spec, first)
    assert not stopped.outcome.completed
    assert stopped.outcome.stop_reason == reason
    assert stopped.outcome.global_step == stop_at
    assert stopped.model_dir is None and not spec.output_dir.exists()
    checkpoint = latest_checkpoint(spec.checkpoint_dir)
    assert checkpoint == spec.checkpoint_dir / f"checkpoint-{stop_at}" == stopped.outcome.checkpoint
    assert {p.name for p in checkpoint.iterdir()} >= CHECKPOINT_FILES
    assert first.checkpoints[-1][:2] == (stop_at, checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch_index"], state["step_in_epoch"]) == (
        stop_at,
        stop_at // 8,
        stop_at % 8,
    )
    # Nothing but finished checkpoints in the directory.
    assert all(p.name.startswith("checkpoint-") for p in spec.checkpoint_dir.iterdir())

    second = Recorder()
    resumed = train_classification(spec, second, resume_from=checkpoint)
    assert resumed.outcome.completed and resumed.model_dir is not None
    assert second.steps[0].step == stop_at + 1
    assert resumed.outcome.global_step == resumed.outcome.total_steps == 24
    assert resumed.outcome.trained_tokens == reference.outcome.trained_tokens
    assert reference.model_dir is not None
    assert_same_weights(resumed.model_dir, reference.model_dir)
    assert resumed.metrics == pytest.approx(reference.metrics, abs=1e-5)
    assert [row["step"] for row in resumed.outcome.history] == [row["step"] for row in reference.outcome.history]
    for got, want in zip(resumed.outcome.history, reference.outcome.history, strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_cancel_stops_without_model_or_checkpoint(tiny_bert: Path, tmp_path: Path) -> None:
    spec = make_spec(tiny_bert, tmp_path)
    recorder = Recorder(stop_at=5, reason="cancel")
    result = train_classification(spec, recorder)
    assert not result.outcome.completed and result.outcome.stop_reason == "cancel"
    assert result.outcome.global_step == 5 and len(recorder.steps) == 5
    assert result.model_dir is None and result.metrics == {} and result.outcome.checkpoint is None
    assert not spec.output_dir.exists()
    assert recorder.checkpoints == [] and latest_checkpoint(spec.checkpoint_dir) is None


def test_resume_refuses_a_different_batch_size(
    tiny_bert: Path, tmp_path: Path, reference: ClassificationResult
) -> None:
    assert reference.outcome.checkpoint is not None
    spec = make_spec(tiny_bert, tmp_path)
    spec.hyperparameters = {**spec.hyperparameters, "batch_size": 4}
    with pytest.raises(ValueError, match="batch_size was 8, now 4"):
        train_classification(spec, NullCallbacks(), resume_from=reference.outcome.checkpoint)


def test_latest_checkpoint_ignores_incomplete_dirs(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    for name in ["checkpoint-3", "checkpoint-12"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-40").mkdir()  # no trainer_state.json: a crash mid-write
    (tmp_path / ".tmp-checkpoint-50-abc").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-12"


class Logistic(torch.nn.Module):
    """A plain torch model (no save_pretrained) that returns a loss like transformers models do."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(2, 8)
        self.dropout = torch.nn.Dropout(0.1)
        self.out = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.out(self.dropout(torch.relu(self.hidden(x))))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def blobs(n: int) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        label = i % 2
        center = torch.tensor([2.0, 2.0]) if label else torch.tensor([-2.0, -2.0])
        rows.append({"x": center + torch.randn(2, generator=generator) * 0.5, "labels": label})
    return rows


def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}


def test_plain_torch_model_trains_and_resumes(tmp_path: Path) -> None:
    data = blobs(64)

    def accuracy(model: torch.nn.Module) -> dict[str, float]:
        batch = collate(data)
        with torch.no_grad():
            predicted = model(**batch)["logits"].argmax(-1)
        return {"accuracy": float((predicted == batch["labels"]).float().mean())}

    def run(directory: Path, callbacks: Recorder, resume: Path | None = None) -> tuple[torch.nn.Module, Any]:
        torch.manual_seed(0)
        model = Logistic()
        args = TrainArgs(n_epochs=4, batch_size=10, learning_rate=0.05, checkpoint_dir=directory, warmup_ratio=0.1)
        return model, run_training(model, data, collate, args, callbacks, accuracy, resume, torch.device("cpu"))

    model, outcome = run(tmp_path / "a", Recorder())
    assert outcome.completed and outcome.global_step == outcome.total_steps == 4 * math.ceil(64 / 10)
    assert outcome.history[-1]["eval_accuracy"] >= 0.95
    assert outcome.trained_tokens == 0  # no attention_mask or input_ids to count
    assert (outcome.checkpoint or Path()).joinpath("model.safetensors").is_file()

    _, paused = run(tmp_path / "b", Recorder(stop_at=10, reason="pause"))
    assert paused.stop_reason == "pause" and paused.checkpoint is not None
    resumed_model, resumed = run(tmp_path / "b", Recorder(), paused.checkpoint)
    assert resumed.completed and resumed.global_step == outcome.global_step
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, resumed_model.state_dict()[name], atol=1e-6), name
