"""Classification fine-tuning end to end on tiny-bert, plus its hyperparameters, split and metrics."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from tests.training.conftest import Recorder, sentiment_rows
from training.classification import (
    ClassificationResult,
    ClassificationSpec,
    compute_metrics,
    resolve_hyperparameters,
    stratified_split,
    train_classification,
    write_results_csv,
)
from training.data import DataError
from training.predict import ClassificationPredictor

# A randomly initialised tiny encoder needs a far larger step than a pretrained one.
FAST_HP = {"learning_rate": 3e-3, "n_epochs": 10, "batch_size": 8}


def test_resolve_hyperparameters_auto() -> None:
    small = resolve_hyperparameters({}, 80)
    assert small == {
        "n_epochs": 10,
        "batch_size": 4,
        "learning_rate": 5e-5,
        "max_seq_length": 128,
        "warmup_ratio": 0.1,
        "weight_decay": 0.0,
    }
    large = resolve_hyperparameters({"n_epochs": "auto", "batch_size": None}, 10_000)
    assert (large["n_epochs"], large["batch_size"]) == (3, 32)
    assert resolve_hyperparameters({}, 2)["batch_size"] == 2


def test_resolve_hyperparameters_explicit_and_multiplier() -> None:
    assert resolve_hyperparameters({"learning_rate_multiplier": 2}, 100)["learning_rate"] == pytest.approx(1e-4)
    explicit = {"learning_rate": 1e-3, "learning_rate_multiplier": 2, "n_epochs": 2, "batch_size": 16}
    resolved = resolve_hyperparameters(explicit, 100)
    assert (resolved["learning_rate"], resolved["n_epochs"], resolved["batch_size"]) == (1e-3, 2, 16)
    assert resolve_hyperparameters(resolved, 5) == resolved


@pytest.mark.parametrize(
    ("hp", "field"),
    [
        ({"n_epochs": 0}, "n_epochs"),
        ({"n_epochs": "many"}, "n_epochs"),
        ({"n_epochs": True}, "n_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": -1e-4}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate_multiplier": 0}, "learning_rate_multiplier"),
        ({"max_seq_length": 4}, "max_seq_length"),
        ({"warmup_ratio": 0.9}, "warmup_ratio"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_resolve_hyperparameters_rejects(hp: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        resolve_hyperparameters(hp, 100)


def test_compute_metrics() -> None:
    metrics, report = compute_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert report["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert report["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_stratified_split() -> None:
    rows = sentiment_rows(80, seed=3)
    train, held = stratified_split(rows, 0.25, seed=7)
    assert len(held) == 20 and len(train) == 60
    assert sum(r["label"] == "positive" for r in held) == 10
    assert sorted(map(str, train + held)) == sorted(map(str, rows))
    assert stratified_split(rows, 0.25, seed=7) == (train, held)
    assert stratified_split(rows, 0.25, seed=8) != (train, held)
    tiny = [{"text": "x", "label": "a"}, {"text": "y", "label": "a"}, {"text": "z", "label": "b"}]
    train, held = stratified_split(tiny, 0.1, seed=0)
    assert len(held) == 1 and held[0]["label"] == "a"
    assert {r["label"] for r in train} == {"a", "b"}


@pytest.fixture(scope="module")
def trained(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ClassificationResult, Recorder]:
    work = tmp_path_factory.mktemp("classification")
    spec = ClassificationSpec(
        base_model_dir=tiny_bert,
        output_dir=work / "model",
        checkpoint_dir=work / "checkpoints",
        train_rows=sentiment_rows(80, seed=1),
        eval_rows=None,
        hyperparameters=resolve_hyperparameters(FAST_HP, 80),
        seed=0,
        eval_fraction=0.25,
    )
    recorder = Recorder()
    return train_classification(spec, recorder), recorder


def test_classification_learns_an_easy_task(trained: tuple[ClassificationResult, Recorder]) -> None:
    result, recorder = trained
    assert result.outcome.completed and result.outcome.stop_reason is None
    assert result.labels == ["negative", "positive"]
    assert result.metrics["accuracy"] >= 0.9
    assert result.metrics["macro_f1"] >= 0.9
    assert result.metrics["eval_loss"] < 0.3
    assert set(result.report) == {"negative", "positive"}
    assert sum(int(r["support"]) for r in result.report.values()) == 20
    # 60 training rows in batches of 8: 8 steps per epoch.
    assert result.outcome.total_steps == result.outcome.global_step == 80
    assert [s.step for s in recorder.steps] == list(range(1, 81))
    assert all(s.samples_per_second > 0 for s in recorder.steps)
    # Linear warmup starts at zero: the first step runs with learning rate 0, as in transformers.
    assert recorder.steps[0].learning_rate == 0.0
    assert all(s.learning_rate > 0 for s in recorder.steps[1:])
    assert result.outcome.trained_tokens > 60 * 10 * 4


def test_classification_history_and_callbacks(trained: tuple[ClassificationResult, Recorder]) -> None:
    result, recorder = trained
    epoch_rows = [row for row in result.outcome.history if "eval_loss" in row]
    assert [row["step"] for row in epoch_rows] == [8 * e for e in range(1, 11)]
    assert [row["epoch"] for row in epoch_rows] == [float(e) for e in range(1, 11)]
    for row in epoch_rows:
        assert {"train_loss", "learning_rate", "eval_accuracy", "eval_macro_f1"} <= set(row)
    assert [step for step, _, _ in recorder.evaluations] == [8 * e for e in range(1, 11)]
    assert recorder.evaluations[-1][2]["eval_accuracy"] == result.metrics["accuracy"]
    assert [step for step, _, _ in recorder.checkpoints] == [8 * e for e in range(1, 11)]
    # Only the newest two checkpoints are kept.
    checkpoint_dir = recorder.checkpoints[-1][1].parent
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["checkpoint-72", "checkpoint-80"]


def test_classification_saves_model_and_report(trained: tuple[ClassificationResult, Recorder]) -> None:
    result, _ = trained
    assert result.model_dir is not None
    config = AutoConfig.from_pretrained(result.model_dir)
    assert config.id2label == {0: "negative", 1: "positive"}
    assert config.label2id == {"negative": 0, "positive": 1}
    report = json.loads((result.model_dir / "eval_report.json").read_text())
    assert report["metrics"] == pytest.approx(result.metrics)
    assert report["labels"] == ["negative", "positive"]
    assert sum(map(sum, report["confusion_matrix"])) == 20
    assert (result.model_dir / "tokenizer.json").is_file()


def test_predictor(trained: tuple[ClassificationResult, Recorder]) -> None:
    result, _ = trained
    assert result.model_dir is not None
    predictor = ClassificationPredictor(result.model_dir, device=torch.device("cpu"))
    texts = ["the soup was lovely", "the coffee was terrible", "the cake was excellent", "the pasta was bad"]
    predictions = predictor.predict(texts, batch_size=3)
    assert [p["label"] for p in predictions] == ["positive", "negative", "positive", "negative"]
    for prediction in predictions:
        assert set(prediction["scores"]) == {"negative", "positive"}
        assert math.isclose(sum(prediction["scores"].values()), 1.0, rel_tol=1e-5)
        assert prediction["score"] == max(prediction["scores"].values()) > 0.5
    assert predictor.predict([]) == []
    # Truncation keeps very long inputs within the model's positions.
    assert predictor.predict(["great " * 1000])[0]["label"] in {"negative", "positive"}


def test_write_results_csv(trained: tuple[ClassificationResult, Recorder], tmp_path: Path) -> None:
    result, _ = trained
    path = tmp_path / "results.csv"
    write_results_csv(result.outcome.history, result.report, path)
    lines = path.read_text().splitlines()
    blank = lines.index("")
    header, *steps = list(csv.reader(lines[:blank]))
    assert header == ["step", "epoch", "train_loss", "learning_rate", "eval_loss", "eval_accuracy", "eval_macro_f1"]
    assert len(steps) == len(result.outcome.history)
    assert steps[-1][0] == "80" and steps[-1][4] != ""
    report_header, *report_rows = list(csv.reader(lines[blank + 1 :]))
    assert report_header == ["label", "precision", "recall", "f1", "support"]
    assert [row[0] for row in report_rows] == ["negative", "positive"]
    assert sum(int(row[4]) for row in report_rows) == 20


def test_text_pairs_and_explicit_eval_rows(tiny_bert: Path, tmp_path: Path) -> None:
    rows = [
        {"text": "review", "text_pair": f"the meal was {w}", "label": lab}
        for w, lab in [("great", "pos"), ("awful", "neg"), ("good", "pos"), ("bad", "neg")] * 4
    ] + [{"text": "the dinner was lovely", "label": "pos"}, {"text": "the dinner was terrible", "label": "neg"}]
    spec = ClassificationSpec(
        base_model_dir=tiny_bert,
        output_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "checkpoints",
        train_rows=rows,
        eval_rows=rows[:4],
        hyperparameters=resolve_hyperparameters({**FAST_HP, "n_epochs": 2}, len(rows)),
        seed=0,
    )
    result = train_classification(spec, Recorder())
    assert result.outcome.completed and result.model_dir is not None
    assert sum(int(r["support"]) for r in result.report.values()) == 4
    predictor = ClassificationPredictor(result.model_dir)
    out = predictor.predict(["review", "review"], text_pairs=["the meal was great", "the meal was awful"])
    assert all(p["label"] in {"pos", "neg"} for p in out)


def test_invalid_rows_are_refused(tiny_bert: Path, tmp_path: Path) -> None:
    spec = ClassificationSpec(
        base_model_dir=tiny_bert,
        output_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "checkpoints",
        train_rows=[{"text": "a", "label": "x"}, {"text": "b", "label": "x"}],
        eval_rows=None,
        hyperparameters={},
        seed=0,
    )
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        train_classification(spec, Recorder())


def test_the_api_model_and_training_share_their_limits() -> None:
    from pydantic import ValidationError

    from training.hyperparameters import LIMITS, Hyperparameters

    for name, limit in LIMITS.items():
        if name == "max_runtime_seconds":
            continue  # the service's budget, not a training setting
        beyond = limit.high * 2
        with pytest.raises(ValidationError, match=name):
            Hyperparameters.model_validate({name: beyond})
        with pytest.raises(ValueError, match=name):
            resolve_hyperparameters({name: beyond}, 100)
        assert Hyperparameters.model_validate({name: limit.high}).requested() == {name: limit.high}
        resolve_hyperparameters({name: limit.high}, 100)
