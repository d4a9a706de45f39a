"""Fine-tuning an encoder for named-entity recognition: tag schemes, word alignment, training, seqeval metrics.

Tags of any accepted scheme (IOB1, IOB2, BIOES) are rewritten as IOB2 before training, so a model always
predicts IOB2. Words are split into sub-tokens by the fast tokenizer (``is_split_into_words=True``); the
first sub-token of a word carries the word's label and the others get -100, so the loss and the
predictions count each word once. Evaluation is entity-level with seqeval (its default, conlleval-like mode).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
from transformers import AutoModelForTokenClassification, AutoTokenizer, set_seed

from training import classification
from training.batching import as_tensors, feature_lengths
from training.callbacks import TrainingCallbacks
from training.classification import EVAL_REPORT_FILE, _max_length, padding_collator
from training.data import DataError, detect_tag_scheme, normalise_tags, random_split, validate_ner
from training.devices import autocast_dtype, pick_device
from training.lora import add_lora_hyperparameters, apply_lora, load_pretrained, save_model_dir
from training.tagging import IOB2Decoder
from training.trainer import Collator, TrainArgs, TrainOutcome, run_training, tokenizer_writer

log = logging.getLogger(__name__)

_EVAL_BATCH_SIZE = 64
# The label of sub-tokens that are not the first of a word, and of special tokens: ignored by the loss.
IGNORE_INDEX = -100


@dataclass
class NerSpec:
    """Everything one NER fine-tune needs; `hyperparameters` come from resolve_hyperparameters."""

    base_model_dir: Path
    output_dir: Path
    checkpoint_dir: Path
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]] | None
    hyperparameters: dict[str, Any]
    seed: int
    eval_fraction: float = 0.1


@dataclass
class NerResult:
    """The run's outcome; `model_dir`, `metrics` and `report` are filled only when it completed.

    `metrics` holds precision, recall, f1, accuracy and eval_loss, plus `per_type` (the same as `report`).
    """

    outcome: TrainOutcome
    model_dir: Path | None
    metrics: dict[str, Any]
    report: dict[str, dict[str, float]]
    labels: list[str]


def resolve_hyperparameters(hp: dict[str, Any], n_train_rows: int) -> dict[str, Any]:
    """Classification's resolution plus `lora` (present only when enabled); raise ValueError naming a field."""
    return add_lora_hyperparameters(classification.resolve_hyperparameters(hp, n_train_rows), hp)


# --- data ----------------------------------------------------------------------------------------


def normalise_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return rows with their tags rewritten as IOB2 (the scheme is detected over all of `rows`)."""
    scheme = detect_tag_scheme(list(enumerate(rows, start=1)))
    return [{"tokens": list(row["tokens"]), "tags": normalise_tags(row["tags"], scheme)} for row in rows]


def ner_label_list(rows: list[dict[str, Any]]) -> list[str]:
    """Return "O" then B-/I- for every entity type in `rows` (IOB2 tags), types in alphabetical order."""
    types = sorted({tag[2:] for row in rows for tag in row["tags"] if tag != "O"})
    return ["O", *(f"{prefix}-{kind}" for kind in types for prefix in ("B", "I"))]


def encode_ner(
    tokenizer: Any, rows: list[dict[str, Any]], label2id: dict[str, int], max_length: int
) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """Return (features, word starts): features label each word's first sub-token, -100 elsewhere.

    `word_starts[i][w]` is the position of word w's first sub-token in feature i, or -1 when the word
    was cut off by truncation (it is then predicted "O").
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("NER needs a fast tokenizer (tokenizer.json) for word alignment")
    if not rows:
        return [], []
    encoded = tokenizer(
        [row["tokens"] for row in rows], is_split_into_words=True, truncation=True, max_length=max_length
    )
    features: list[dict[str, Any]] = []
    starts: list[list[int]] = []
    for i, row in enumerate(rows):
        word_ids = encoded.word_ids(i)
        labels: list[int] = []
        word_start = [-1] * len(row["tokens"])
        previous: int | None = None
        for position, word in enumerate(word_ids):
            if word is not None and word != previous:
                labels.append(label2id[row["tags"][word]])
                word_start[word] = position
            else:
                labels.append(IGNORE_INDEX)
            previous = word
        feature = {key: encoded[key][i] for key in encoded}
        feature["labels"] = labels
        features.append(feature)
        starts.append(word_start)
    return features, starts


# --- metrics -------------------------------------------------------------------------------------


def compute_ner_metrics(
    y_true: list[list[str]], y_pred: list[list[str]]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Return ({precision, recall, f1, accuracy}, {TYPE: {precision, recall, f1, support}}) with seqeval."""
    with warnings.catch_warnings():
        # seqeval warns when a type is never predicted; zero_division=0 already scores that as 0.
        warnings.simplefilter("ignore")
        metrics = {
            "precision": float(precision_score(y_true, y_pred, zero_division=0)),
            "recall": float(recall_score(y_true, y_pred, zero_division=0)),
            "f1": float(f1_score(y_true, y_pred, zero_division=0)),
            "accuracy": float(accuracy_score(y_true, y_pred)) if any(y_true) else 0.0,
        }
        table = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    report = {
        kind: {
            "precision": float(scores["precision"]),
            "recall": float(scores["recall"]),
            "f1": float(scores["f1-score"]),
            "support": int(scores["support"]),
        }
        for kind, scores in sorted(table.items())
        if not kind.endswith(" avg")
    }
    return metrics, report


def _predict_tags(
    model: torch.nn.Module,
    features: list[dict[str, Any]],
    word_starts: list[list[int]],
    collator: Collator,
    id2label: dict[int, str],
) -> tuple[float, list[list[str]]]:
    """Return (mean loss over labelled sub-tokens, predicted IOB2 tags per word) for `features`."""
    decoder = IOB2Decoder([id2label[i] for i in range(len(id2label))])
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(device)
    total_loss = 0.0
    n_labelled = 0
    predicted: list[list[str]] = []
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
            total_loss += float(
                torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                ).item()
            )
            n_labelled += int((labels != IGNORE_INDEX).sum().item())
            log_probs = logits.log_softmax(dim=-1).cpu().numpy()
            for row, starts in zip(log_probs, word_starts[start : start + _EVAL_BATCH_SIZE], strict=True):
                predicted.append(_decode_words(decoder, row, starts))
    model.train(was_training)
    return total_loss / max(1, n_labelled), _repair_iob2(predicted)


def _decode_words(decoder: IOB2Decoder, log_probs: np.ndarray, starts: list[int]) -> list[str]:
    """Each word's tag from its first sub-token's log-probabilities, as the best valid IOB2 sequence; a word
    cut off by truncation is "O"."""
    kept = [p for p in starts if p >= 0]
    decoded = iter(decoder.tags(log_probs[kept]))
    return [next(decoded) if p >= 0 else "O" for p in starts]


def _repair_iob2(rows: list[list[str]]) -> list[list[str]]:
    # Decoding gives valid IOB2 over the words that have sub-tokens; a word without one in the middle of an
    # entity (one the tokenizer maps to nothing) is "O" and can leave an I-X with no entity open: read it as
    # opening one, as conlleval does.
    return [normalise_tags(tags, "IOB2") for tags in rows]


# --- training ------------------------------------------------------------------------------------


def train_ner(
    spec: NerSpec,
    callbacks: TrainingCallbacks,
    resume_from: Path | None = None,
    device: torch.device | None = None,
) -> NerResult:
    """Fine-tune `spec.base_model_dir` for NER; save model (or LoRA adapter), tokenizer and report when done."""
    problems = validate_ner(list(enumerate(spec.train_rows, start=1)))
    if spec.eval_rows is not None:
        eval_problems = validate_ner(list(enumerate(spec.eval_rows, start=1)))
        problems.extend(f"validation data: {problem}" for problem in eval_problems)
    if problems:
        raise DataError(problems)
    hp = resolve_hyperparameters(spec.hyperparameters, len(spec.train_rows))
    device = device or pick_device()
    rows = normalise_rows(spec.train_rows)
    if spec.eval_rows is None:
        train_rows, eval_rows = random_split(rows, spec.eval_fraction, spec.seed)
    else:
        train_rows, eval_rows = rows, normalise_rows(spec.eval_rows)
    labels = ner_label_list(train_rows + eval_rows)
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = dict(enumerate(labels))

    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    set_seed(spec.seed)
    base = load_pretrained(
        AutoModelForTokenClassification,
        spec.base_model_dir,
        # Train in float32 whatever the checkpoint's dtype; autocast gives the speed on GPUs.
        dtype=torch.float32,
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
    )
    max_length = _max_length(tokenizer, base, int(hp["max_seq_length"]))
    model: torch.nn.Module = base
    if "lora" in hp:
        wrapped = apply_lora(base, hp["lora"], "ner", spec.base_model_dir)
        # Record the target modules actually adapted, not "auto".
        hp["lora"] = wrapped.lora
        model = wrapped
    train_lists, _ = encode_ner(tokenizer, train_rows, label2id, max_length)
    eval_lists, eval_starts = encode_ner(tokenizer, eval_rows, label2id, max_length)
    # Tensors once, here, so a step only pads and stacks them.
    train_features, eval_features = as_tensors(train_lists), as_tensors(eval_lists)
    eval_truth = [row["tags"] for row in eval_rows]
    # Multiples of 8 let tensor cores work on GPUs; on CPU they would only add padding.
    collator = padding_collator(
        tokenizer, pad_to_multiple_of=8 if device.type == "cuda" else None, label_pad=IGNORE_INDEX
    )

    def evaluate(trained: torch.nn.Module) -> dict[str, float]:
        loss, predicted = _predict_tags(trained, eval_features, eval_starts, collator, id2label)
        metrics, _ = compute_ner_metrics(eval_truth, predicted)
        return {
            "eval_loss": loss,
            "eval_precision": metrics["precision"],
            "eval_recall": metrics["recall"],
            "eval_f1": metrics["f1"],
            "eval_accuracy": metrics["accuracy"],
        }

    args = TrainArgs.from_hyperparameters(hp, spec.checkpoint_dir, spec.seed)
    args.checkpoint_extras = tokenizer_writer(tokenizer, max_length)
    log.info(
        "ner: %d train rows, %d eval rows, %d labels, max_length %d, %s",
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
        return NerResult(outcome=outcome, model_dir=None, metrics={}, report={}, labels=labels)

    metrics: dict[str, Any] = {}
    report: dict[str, dict[str, float]] = {}
    if eval_features:
        loss, predicted = _predict_tags(model, eval_features, eval_starts, collator, id2label)
        scores, report = compute_ner_metrics(eval_truth, predicted)
        metrics = {**scores, "eval_loss": loss, "per_type": report}
    eval_report = {
        "labels": labels,
        "metrics": metrics,
        "report": report,
        "n_train": len(train_rows),
        "n_eval": len(eval_rows),
        "hyperparameters": hp,
        "max_length": max_length,
    }
    # Predictions then truncate where training did: longer positions were never tuned.
    tokenizer.model_max_length = max_length
    save_model_dir(model, tokenizer, spec.output_dir, {EVAL_REPORT_FILE: json.dumps(eval_report, indent=2)})
    return NerResult(outcome=outcome, model_dir=spec.output_dir, metrics=metrics, report=report, labels=labels)
