"""Fine-tuning a causal language model on prompt/completion, chat or plain-text rows.

Loss masking: only what the model should learn to write counts. For ``{"prompt", "completion"}`` rows
that is the completion plus an end-of-sequence token (so the model learns to stop); for
``{"messages"}`` rows, each assistant turn as the chat template renders it (content and end-of-turn
marker); for ``{"text"}`` rows, every token plus an end-of-sequence token. Everything else is labelled
-100. The prompt and the completion are tokenized apart, exactly as a prompt is encoded at inference.

Chat format: the tokenizer's chat template when it has one; otherwise ``FALLBACK_CHAT_TEMPLATE``
(``<|role|>\\ncontent<eos>\\n`` per message), which is then saved with the fine-tuned tokenizer so
the predictor formats chats the same way.

Batching: rows are sorted by length (ties in a seeded random order) and cut into fixed batches once;
run_training then shuffles those batches each epoch. Every batch holds rows of similar length, so little
compute goes to padding, and the batches never change between runs, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from training import classification
from training.callbacks import StepState, StopReason, TrainingCallbacks
from training.classification import EVAL_REPORT_FILE, _max_length
from training.data import DataError, Row, random_split, validate_generation
from training.devices import autocast_dtype, pick_device
from training.lora import add_lora_hyperparameters, apply_lora, load_pretrained, save_model_dir
from training.trainer import TrainArgs, TrainOutcome, run_training, tokenizer_writer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_GENERATION_MAX_SEQ_LENGTH = 512
_EVAL_BATCH_SIZE = 8
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# exp() of a larger loss overflows a float; no real model gets near it.
_MAX_LOG_PERPLEXITY = 700.0


@dataclass
class GenerationSpec:
    """Everything one causal-LM fine-tune needs; `hyperparameters` come from resolve_hyperparameters."""

    base_model_dir: Path
    output_dir: Path
    checkpoint_dir: Path
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]] | None
    hyperparameters: dict[str, Any]
    seed: int
    eval_fraction: float = 0.1


@dataclass
class GenerationResult:
    """The run's outcome; `model_dir` and `metrics` are filled only when it completed.

    `metrics`: eval_loss and perplexity after training, eval_loss_before and perplexity_before.
    """

    outcome: TrainOutcome
    model_dir: Path | None
    metrics: dict[str, float]


def resolve_hyperparameters(hp: dict[str, Any], n_train_rows: int) -> dict[str, Any]:
    """Classification's resolution, a longer default max_seq_length, and `lora` when enabled."""
    resolved = classification.resolve_hyperparameters(hp, n_train_rows)
    if hp.get("max_seq_length") in (None, "auto"):
        resolved["max_seq_length"] = DEFAULT_GENERATION_MAX_SEQ_LENGTH
    return add_lora_hyperparameters(resolved, hp)


def perplexity(loss: float) -> float:
    """Return exp(loss), the perplexity of a mean token cross-entropy."""
    return math.exp(min(loss, _MAX_LOG_PERPLEXITY))


# --- encoding ------------------------------------------------------------------------------------


def ensure_chat_template(tokenizer: Any) -> None:
    """Give `tokenizer` the fallback chat template when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Encode a prompt as inference does; an empty one becomes the BOS (or EOS) token, so there is context."""
    ids: list[int] = tokenizer(prompt)["input_ids"]
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [int(start)]
    return ids


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return text


def chat_segments(tokenizer: Any, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) pieces; assistant turns are the trained ones."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = _render(tokenizer, messages, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if i > 0:
            start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
        else:
            # Templates refuse an empty conversation, so find the opening reply's content directly.
            start = through.rfind(message["content"]) if message["content"] else len(through)
        if not (full.startswith(through) and cursor <= start <= len(through)):
            raise ValueError("the chat template does not render this conversation message by message")
        pieces.append((full[cursor:start], False))
        pieces.append((full[start : len(through)], True))
        cursor = len(through)
    pieces.append((full[cursor:], False))
    return [(text, trained) for text, trained in pieces if text]


def _encode_row(tokenizer: Any, row: dict[str, Any], max_length: int) -> tuple[list[int], list[int]]:
    eos = int(tokenizer.eos_token_id)
    if "messages" in row:
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in chat_segments(tokenizer, row["messages"]):
            piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if trained and eos not in piece:
                # The template closes turns without the EOS token; the model still has to learn to stop.
                piece.append(eos)
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
        return ids[:max_length], labels[:max_length]
    if "completion" in row:
        prompt = prompt_ids(tokenizer, row["prompt"])
        completion = [*tokenizer(row["completion"], add_special_tokens=False)["input_ids"], eos]
        if len(prompt) + len(completion) > max_length:
            # Keep as much completion as fits beside at least half a window of the prompt's end.
            kept = min(len(completion), max_length - min(len(prompt), max_length // 2))
            completion = completion[:kept]
            prompt = prompt[len(prompt) - (max_length - kept) :] if max_length > kept else []
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    ids = [*tokenizer(row["text"])["input_ids"], eos][:max_length]
    return ids, list(ids)


def encode_generation(
    tokenizer: Any, rows: list[dict[str, Any]], max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Return (features with input_ids and labels, number of rows dropped for having nothing to learn)."""
    features: list[dict[str, list[int]]] = []
    problems: list[str] = []
    dropped = 0
    for line, row in enumerate(rows, start=1):
        try:
            ids, labels = _encode_row(tokenizer, row, max_length)
        except ValueError as exc:
            problems.append(f"line {line}: {exc}")
            continue
        # The model predicts token t+1 from position t, so the first label never counts.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        features.append({"input_ids": ids, "labels": labels})
    if problems:
        raise DataError(problems)
    return features, dropped


def length_groups(features: list[dict[str, list[int]]], batch_size: int, seed: int) -> list[list[int]]:
    """Cut row indices, sorted by length (ties seeded), into batches of `batch_size`: one fixed grouping."""
    tiebreak = list(range(len(features)))
    random.Random(seed).shuffle(tiebreak)
    order = sorted(range(len(features)), key=lambda i: (len(features[i]["input_ids"]), tiebreak[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class GroupedBatches:
    """A dataset whose items are whole length-grouped batches (lists of features)."""

    def __init__(self, features: list[dict[str, list[int]]], groups: list[list[int]]) -> None:
        self.features = features
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[dict[str, list[int]]]:
        return [self.features[i] for i in self.groups[index]]


class CausalLMCollator:
    """Pad features (or lists of them, from GroupedBatches) on the right; padding is masked and unlabelled."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[Any]) -> dict[str, torch.Tensor]:
        features = [f for item in items for f in (item if isinstance(item, list) else [item])]
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class _RowsPerStepCallbacks:
    """Forwards callbacks, turning batches per second into rows per second (one dataset item is a batch)."""

    def __init__(self, inner: TrainingCallbacks, rows_per_item: float) -> None:
        self.inner = inner
        self.rows_per_item = rows_per_item

    def on_step(self, state: StepState) -> None:
        self.inner.on_step(replace(state, samples_per_second=state.samples_per_second * self.rows_per_item))

    def on_log(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        self.inner.on_log(step, epoch, metrics)

    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        self.inner.on_evaluate(step, epoch, metrics)

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        self.inner.on_checkpoint(step, path, metrics)

    def should_stop(self) -> StopReason | None:
        return self.inner.should_stop()


# --- evaluation ----------------------------------------------------------------------------------


def evaluate_loss(model: torch.nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Return the mean cross-entropy per labelled token over pre-collated `batches`."""
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(device)
    total = 0.0
    count = 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in batches:
            labels = batch["labels"].to(device)
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(**inputs).logits
            # Position t predicts token t+1.
            shifted = logits[:, :-1].float().flatten(0, 1)
            targets = labels[:, 1:].flatten()
            total += float(
                torch.nn.functional.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            )
            count += int((targets != IGNORE_INDEX).sum().item())
    model.train(was_training)
    return total / max(1, count)


# --- training ------------------------------------------------------------------------------------


def load_for_training(spec: GenerationSpec, max_seq_length: int) -> tuple[Any, Any, int]:
    """The tokenizer (with a pad token and a chat template) and the base model in float32, seeded; and the
    sequence length to train at. Shared by supervised and preference (DPO) training."""
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{spec.base_model_dir}: the tokenizer has no end-of-sequence token")
    if tokenizer.pad_token_id is None:
        # Padding is masked out and unlabelled, so any id will do; EOS is always there.
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer)
    set_seed(spec.seed)
    # Train in float32 whatever the checkpoint's dtype; autocast gives the speed on GPUs.
    base = load_pretrained(AutoModelForCausalLM, spec.base_model_dir, dtype=torch.float32)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if base.generation_config.pad_token_id is None:
        base.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, base, _max_length(tokenizer, base, max_seq_length)


def validated_split(spec: GenerationSpec, validate: Callable[[Iterable[Row]], list[str]]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The spec's (train, eval) rows once `validate` finds no problem in either (DataError naming the lines
    otherwise); without eval rows, a seeded share of the training rows is held out."""
    problems = validate(enumerate(spec.train_rows, start=1))
    if spec.eval_rows is not None:
        problems.extend(f"validation data: {problem}" for problem in validate(enumerate(spec.eval_rows, start=1)))
    if problems:
        raise DataError(problems)
    if spec.eval_rows is None:
        return random_split(spec.train_rows, spec.eval_fraction, spec.seed)
    return spec.train_rows, spec.eval_rows


def train_generation(
    spec: GenerationSpec,
    callbacks: TrainingCallbacks,
    resume_from: Path | None = None,
    device: torch.device | None = None,
) -> GenerationResult:
    """Fine-tune a causal LM; save model (or LoRA adapter), tokenizer and report when done."""
    train_rows, eval_rows = validated_split(spec, validate_generation)
    hp = resolve_hyperparameters(spec.hyperparameters, len(spec.train_rows))
    device = device or pick_device()

    tokenizer, base, max_length = load_for_training(spec, int(hp["max_seq_length"]))
    model: torch.nn.Module = base
    if "lora" in hp:
        wrapped = apply_lora(base, hp["lora"], "generation", spec.base_model_dir)
        # Record the target modules actually adapted, not "auto".
        hp["lora"] = wrapped.lora
        model = wrapped

    train_features, dropped = encode_generation(tokenizer, train_rows, max_length)
    eval_features, eval_dropped = encode_generation(tokenizer, eval_rows, max_length)
    if dropped or eval_dropped:
        log.warning(
            "generation: %d train and %d eval rows have nothing to learn within %d tokens; skipped",
            dropped,
            eval_dropped,
            max_length,
        )
    if not train_features:
        raise DataError([f"no training row has completion or assistant tokens within the first {max_length} tokens"])
    batch_size = int(hp["batch_size"])
    # Multiples of 8 let tensor cores work on GPUs; on CPU they would only add padding.
    collator = CausalLMCollator(int(tokenizer.pad_token_id), pad_to_multiple_of=8 if device.type == "cuda" else None)
    train_data = GroupedBatches(train_features, length_groups(train_features, batch_size, spec.seed))
    eval_batches = [
        collator([eval_features[i] for i in group])
        for group in length_groups(eval_features, _EVAL_BATCH_SIZE, spec.seed)
    ]

    def evaluate(trained: torch.nn.Module) -> dict[str, float]:
        loss = evaluate_loss(trained, eval_batches)
        return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}

    before: dict[str, float] = {}
    if eval_batches:
        model.to(device)
        loss_before = evaluate_loss(model, eval_batches)
        before = {"eval_loss_before": loss_before, "perplexity_before": perplexity(loss_before)}

    # One dataset item is a whole length-grouped batch.
    args = TrainArgs.from_hyperparameters(hp, spec.checkpoint_dir, spec.seed, batch_size=1)
    args.checkpoint_extras = tokenizer_writer(tokenizer)
    log.info(
        "generation: %d train rows in %d batches, %d eval rows, max_length %d, %s",
        len(train_features),
        len(train_data),
        len(eval_features),
        max_length,
        hp,
    )
    outcome = run_training(
        model,
        train_data,
        collator,
        args,
        _RowsPerStepCallbacks(callbacks, len(train_features) / len(train_data)),
        evaluate=evaluate if eval_batches else None,
        resume_from=resume_from,
        device=device,
    )
    if not outcome.completed:
        return GenerationResult(outcome=outcome, model_dir=None, metrics={})

    metrics: dict[str, float] = {}
    if eval_batches:
        loss = evaluate_loss(model, eval_batches)
        metrics = {"eval_loss": loss, "perplexity": perplexity(loss), **before}
    eval_report = {
        "metrics": metrics,
        "n_train": len(train_features),
        "n_eval": len(eval_features),
        "n_dropped": dropped + eval_dropped,
        "hyperparameters": hp,
        "max_length": max_length,
    }
    save_model_dir(model, tokenizer, spec.output_dir, {EVAL_REPORT_FILE: json.dumps(eval_report, indent=2)})
    return GenerationResult(outcome=outcome, model_dir=spec.output_dir, metrics=metrics)
