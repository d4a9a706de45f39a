"""Fine-tuning an encoder for text classification: hyperparameters, data split, training, metrics."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    set_seed,
)

from training.batching import PaddingCollator, as_tensors, feature_lengths
from training.callbacks import TrainingCallbacks
from training.data import DataError, validate_classification
from training.devices import autocast_dtype, pick_device
from training.fsutil import atomic_write_text, replace_dir, temp_dir_beside
from training.hyperparameters import LIMITS
from training.lora import apply_lora, resolve_lora
from training.trainer import Collator, TrainArgs, TrainOutcome, run_training, tokenizer_writer

log = logging.getLogger(__name__)

BASE_LEARNING_RATE = 5e-5
DEFAULT_MAX_SEQ_LENGTH = 128
DEFAULT_WARMUP_RATIO = 0.1
DEFAULT_WEIGHT_DECAY = 0.0
EVAL_REPORT_FILE = "eval_report.json"
_EVAL_BATCH_SIZE = 64
# Tokenizers without a real limit report a huge sentinel as model_max_length.
_NO_LIMIT = 1_000_000


@dataclass
class ClassificationSpec:
    """Everything one classification fine-tune needs; `hyperparameters` come from resolve_hyperparameters."""

    base_model_dir: Path
    output_dir: Path
    checkpoint_dir: Path
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]] | None
    hyperparameters: dict[str, Any]
    seed: int
    eval_fraction: float = 0.1


@dataclass
class ClassificationResult:
    """The run's outcome; `model_dir`, `metrics` and `report` are filled only when it completed."""

    outcome: TrainOutcome
    model_dir: Path | None
    metrics: dict[str, float]
    report: dict[str, dict[str, float]]
    labels: list[str]


# --- hyperparameters ---------------------------------------------------------------------------


def _is_auto(value: Any) -> bool:
    return value is None or value == "auto"


def _int_field(hp: dict[str, Any], name: str) -> int | None:
    value = hp.get(name)
    if _is_auto(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'{name} must be an integer or "auto", got {value!r}')
    LIMITS[name].check(name, value)
    return value


def _float_field(hp: dict[str, Any], name: str) -> float | None:
    value = hp.get(name)
    if _is_auto(value):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f'{name} must be a number or "auto", got {value!r}')
    LIMITS[name].check(name, value)
    return float(value)


def resolve_hyperparameters(hp: dict[str, Any], n_train_rows: int) -> dict[str, Any]:
    """Turn "auto"/absent values into concrete ones; raise ValueError naming an invalid field."""
    n_rows = max(1, n_train_rows)
    n_epochs = _int_field(hp, "n_epochs")
    batch_size = _int_field(hp, "batch_size")
    learning_rate = _float_field(hp, "learning_rate")
    multiplier = _float_field(hp, "learning_rate_multiplier")
    max_seq_length = _int_field(hp, "max_seq_length")
    warmup_ratio = _float_field(hp, "warmup_ratio")
    weight_decay = _float_field(hp, "weight_decay")
    if batch_size is None:
        # About 25 rows per batch element, as a power of two in [4, 32], never above the row count.
        batch_size = min(n_rows, 32, max(4, 2 ** round(math.log2(max(n_rows / 25, 1)))))
    if n_epochs is None:
        # Small sets need more passes to move a freshly initialised head; large ones need few.
        n_epochs = min(10, max(3, math.ceil(2000 / n_rows)))
    if learning_rate is None:
        learning_rate = BASE_LEARNING_RATE * (multiplier if multiplier is not None else 1.0)
    return {
        "n_epochs": n_epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "max_seq_length": max_seq_length if max_seq_length is not None else DEFAULT_MAX_SEQ_LENGTH,
        "warmup_ratio": warmup_ratio if warmup_ratio is not None else DEFAULT_WARMUP_RATIO,
        "weight_decay": weight_decay if weight_decay is not None else DEFAULT_WEIGHT_DECAY,
    }


# --- data ----------------------------------------------------------------------------------------


def _label_key(label: str) -> tuple[int, int, str]:
    # Integer labels sort numerically ("2" before "10"), then string labels alphabetically.
    stripped = label[1:] if label.startswith("-") else label
    if stripped.isdigit():
        return (0, int(label), "")
    return (1, 0, label)


def label_list(rows: list[dict[str, Any]]) -> list[str]:
    """Return the distinct labels of `rows` as strings, integers first in numeric order."""
    return sorted({str(row["label"]) for row in rows}, key=_label_key)


def stratified_split(
    rows: list[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split rows into (train, eval) with about `eval_fraction` of each label held out, seeded."""
    rng = random.Random(seed)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(str(row["label"]), []).append(row)
    train: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    groups = [by_label[label] for label in sorted(by_label, key=_label_key)]
    n_eval = [min(len(g) - 1, round(len(g) * eval_fraction)) if len(g) > 1 else 0 for g in groups]
    if eval_fraction > 0 and sum(n_eval) == 0:
        # Hold out at least one row when some label can spare one, so there is an evaluation at all.
        largest = max(range(len(groups)), key=lambda i: len(groups[i]))
        if len(groups[largest]) > 1:
            n_eval[largest] = 1
    for group, k in zip(groups, n_eval, strict=True):
        shuffled = list(group)
        rng.shuffle(shuffled)
        held.extend(shuffled[:k])
        train.extend(shuffled[k:])
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def _max_length(tokenizer: Any, model: PreTrainedModel, requested: int) -> int:
    limits = [requested]
    if 0 < int(tokenizer.model_max_length) < _NO_LIMIT:
        limits.append(int(tokenizer.model_max_length))
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits)


def _encode(
    tokenizer: Any, rows: list[dict[str, Any]], label2id: dict[str, int], max_length: int
) -> list[dict[str, Any]]:
    features: list[dict[str, Any]] = [{} for _ in rows]
    plain = [i for i, row in enumerate(rows) if not isinstance(row.get("text_pair"), str)]
    paired = [i for i, row in enumerate(rows) if isinstance(row.get("text_pair"), str)]
    # A tokenizer call takes pairs for every row or for none, so encode the two groups apart.
    for group, with_pair in ((plain, False), (paired, True)):
        if not group:
            continue
        texts = [rows[i]["text"] for i in group]
        pairs = [rows[i]["text_pair"] for i in group] if with_pair else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        for j, i in enumerate(group):
            feature = {key: encoded[key][j] for key in encoded}
            feature["labels"] = label2id[str(rows[i]["label"])]
            features[i] = feature
    return features


def padding_collator(tokenizer: Any, pad_to_multiple_of: int | None = None, label_pad: int | None = None) -> Collator:
    """A collator padding input ids with the tokenizer's pad token (and sequence labels with `label_pad`)."""
    pad_values = {"input_ids": int(tokenizer.pad_token_id), "token_type_ids": int(tokenizer.pad_token_type_id)}
    if label_pad is not None:
        pad_values["labels"] = label_pad
    return PaddingCollator(pad_values, pad_to_multiple_of)


# --- metrics -------------------------------------------------------------------------------------


def compute_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Return ({accuracy, macro_f1}, {label: {precision, recall, f1, support}}) from class ids."""
    n = len(labels)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(n), where=denominator > 0)
    # Like scikit-learn: average over the labels that occur in the truth or the predictions.
    present = (support > 0) | (predicted > 0)
    macro_f1 = float(f1[present].mean()) if present.any() else 0.0
    accuracy = float(tp.sum() / len(y_true)) if len(y_true) else 0.0
    report = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    return {"accuracy": accuracy, "macro_f1": macro_f1}, report


def _predict_features(
    model: torch.nn.Module, features: list[dict[str, Any]], collator: Collator
) -> tuple[float, np.ndarray, np.ndarray]:
    """Return (mean loss, true ids, predicted ids) over `features`."""
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(device)
    total_loss = 0.0
    trues: list[np.ndarray] = []
    preds: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(features), _EVAL_BATCH_SIZE):
            batch = dict(collator(features[start : start + _EVAL_BATCH_SIZE]))
            labels = batch.pop("labels").to(device)
            inputs = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(**inputs).logits
            logits = logits.float()
            total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item())
            trues.append(labels.cpu().numpy())
            preds.append(logits.argmax(dim=-1).cpu().numpy())
    model.train(was_training)
    return total_loss / max(1, len(features)), np.concatenate(trues), np.concatenate(preds)


# --- training ------------------------------------------------------------------------------------


def train_classification(
    spec: ClassificationSpec,
    callbacks: TrainingCallbacks,
    resume_from: Path | None = None,
    device: torch.device | None = None,
) -> ClassificationResult:
    """Fine-tune `spec.base_model_dir` for classification; save model, tokenizer and report when done."""
    problems = validate_classification(list(enumerate(spec.train_rows, start=1)))
    if problems:
        raise DataError(problems)
    hp = resolve_hyperparameters(spec.hyperparameters, len(spec.train_rows))
    device = device or pick_device()
    if spec.eval_rows is None:
        train_rows, eval_rows = stratified_split(spec.train_rows, spec.eval_fraction, spec.seed)
    else:
        train_rows, eval_rows = spec.train_rows, spec.eval_rows
    labels = label_list(train_rows + eval_rows)
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = dict(enumerate(labels))

    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    set_seed(spec.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        spec.base_model_dir, num_labels=len(labels), id2label=id2label, label2id=label2id
    )
    model.config.problem_type = "single_label_classification"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Decoder tokenizers often ship without a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    max_length = _max_length(tokenizer, model, int(hp["max_seq_length"]))
    lora = resolve_lora(spec.hyperparameters.get("lora"))
    if lora is not None:
        # Only the adapter and the new head train; the checkpoints and model dir then hold just those.
        model = apply_lora(model, lora, "classification", spec.base_model_dir)
    # Tensors once, here, so a step only pads and stacks them.
    train_features = as_tensors(_encode(tokenizer, train_rows, label2id, max_length))
    eval_features = as_tensors(_encode(tokenizer, eval_rows, label2id, max_length))
    # Multiples of 8 let tensor cores work on GPUs; on CPU they would only add padding.
    collator = padding_collator(tokenizer, pad_to_multiple_of=8 if device.type == "cuda" else None)

    def evaluate(trained: torch.nn.Module) -> dict[str, float]:
        loss, y_true, y_pred = _predict_features(trained, eval_features, collator)
        metrics, _ = compute_metrics(y_true, y_pred, labels)
        return {"eval_loss": loss, "eval_accuracy": metrics["accuracy"], "eval_macro_f1": metrics["macro_f1"]}

    args = TrainArgs.from_hyperparameters(hp, spec.checkpoint_dir, spec.seed)
    args.checkpoint_extras = tokenizer_writer(tokenizer, max_length)
    log.info(
        "classification: %d train rows, %d eval rows, %d labels, max_length %d, %s",
        len(train_rows),
        len(eval_rows),
        len(labels),
        max_length,
        hp,
    )
    outcome = run_training(
        model,
        train_features,
        collator,
        args,
        callbacks,
        evaluate=evaluate if eval_features else None,
        resume_from=resume_from,
        device=device,
        lengths=feature_lengths(train_features),
    )
    if not outcome.completed:
        return ClassificationResult(outcome=outcome, model_dir=None, metrics={}, report={}, labels=labels)

    metrics: dict[str, float] = {}
    report: dict[str, dict[str, float]] = {}
    confusion: list[list[int]] = []
    if eval_features:
        loss, y_true, y_pred = _predict_features(model, eval_features, collator)
        metrics, report = compute_metrics(y_true, y_pred, labels)
        metrics["eval_loss"] = loss
        matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
        np.add.at(matrix, (y_true, y_pred), 1)
        confusion = matrix.tolist()
    eval_report = {
        "labels": labels,
        "metrics": metrics,
        "report": report,
        "confusion_matrix": confusion,
        "n_train": len(train_rows),
        "n_eval": len(eval_rows),
        "hyperparameters": hp,
        "max_length": max_length,
    }
    _save_model_dir(model, tokenizer, max_length, eval_report, spec.output_dir)
    return ClassificationResult(
        outcome=outcome, model_dir=spec.output_dir, metrics=metrics, report=report, labels=labels
    )


def _save_model_dir(
    model: PreTrainedModel, tokenizer: Any, max_length: int, eval_report: dict[str, Any], output_dir: Path
) -> None:
    tmp = temp_dir_beside(output_dir)
    try:
        model.save_pretrained(tmp)
        # Predictions then truncate where training did: longer positions were never tuned.
        tokenizer_writer(tokenizer, max_length)(tmp)
        (tmp / EVAL_REPORT_FILE).write_text(json.dumps(eval_report, indent=2), encoding="utf-8")
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- results -------------------------------------------------------------------------------------

_FIXED_COLUMNS = ["step", "epoch", "train_loss", "learning_rate", "eval_loss"]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_results_csv(history: list[dict[str, Any]], report: dict[str, dict[str, float]], path: Path) -> None:
    """Write step metrics, a blank line, then the per-label evaluation report as one CSV file."""
    extra = sorted({k for row in history for k in row if k.startswith("eval_") and k not in _FIXED_COLUMNS})
    columns = _FIXED_COLUMNS + extra
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in history:
        writer.writerow([_cell(row.get(column)) for column in columns])
    writer.writerow([])
    writer.writerow(["label", "precision", "recall", "f1", "support"])
    for label, scores in report.items():
        writer.writerow(
            [label, *(_cell(scores.get(k)) for k in ("precision", "recall", "f1")), _cell(scores.get("support"))]
        )
    atomic_write_text(path, buffer.getvalue())
