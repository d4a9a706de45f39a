"""Each fine-tuning task's reader, validator, hyperparameter defaults, trainer and predictor, in one table.

Imports of torch-heavy modules happen on first use, inside the worker process that needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import get_settings

TASKS = ("classification", "ner", "generation")
MAX_PROBLEMS_SHOWN = 5


@dataclass(frozen=True)
class Recipe:
    validate: Callable[[list[tuple[int, dict[str, Any]]]], list[str]]
    resolve: Callable[[dict[str, Any], int], dict[str, Any]]
    spec: Callable[..., Any]
    train: Callable[..., Any]


def recipe(task: str, method: str = "supervised") -> Recipe:
    """The steps of ``task``; ``method`` "dpo" (generation only) trains on preference pairs instead."""
    from training import classification, data, dpo, generation, ner
    from training.lora import add_lora_hyperparameters

    if method == "dpo":
        return Recipe(data.validate_dpo, dpo.resolve_hyperparameters, generation.GenerationSpec, dpo.train_dpo)

    def classification_hyperparameters(hp: dict[str, Any], n: int) -> dict[str, Any]:
        return add_lora_hyperparameters(classification.resolve_hyperparameters(hp, n), hp)

    table = {
        "classification": Recipe(data.validate_classification, classification_hyperparameters,
                                 classification.ClassificationSpec, classification.train_classification),
        "ner": Recipe(data.validate_ner, ner.resolve_hyperparameters, ner.NerSpec, ner.train_ner),
        "generation": Recipe(data.validate_generation, generation.resolve_hyperparameters,
                             generation.GenerationSpec, generation.train_generation),
    }
    return table[task]


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """JSON Lines, or CoNLL columns for NER; raises DataError naming lines."""
    from training.conll import read_conll
    from training.data import looks_like_conll, read_jsonl

    return read_conll(path) if looks_like_conll(path) else read_jsonl(path)


def load_rows(path: Path, task: str | None, model_tasks: list[str],
              method: str = "supervised") -> tuple[str, list[dict[str, Any]]]:
    """Read, infer the task when not given, and validate; raises DataError with the first problems by line."""
    from training.data import DataError, infer_task, is_preference_row

    numbered = read_rows(path)
    if method == "dpo":
        # Preference pairs train a generation model; no other task reads them.
        task = task or "generation"
        if task != "generation":
            raise DataError([f"DPO trains generation models, not {task}"])
    else:
        pairs = [line for line, row in numbered if is_preference_row(row)]
        if pairs:
            raise DataError([f"line {pairs[0]}: this is a DPO preference pair (\"input\", \"preferred_output\", "
                             '"non_preferred_output"); create the job with method {"type": "dpo"} to train on it'])
        task = task or infer_task(numbered)
    if task not in model_tasks:
        raise DataError([f"the file holds {task} data, but the model serves {', '.join(model_tasks)}"])
    problems = recipe(task, method).validate(numbered)
    if problems:
        raise DataError(problems)
    return task, [row for _, row in numbered]


def problems_message(problems: list[str]) -> str:
    message = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = len(problems) - MAX_PROBLEMS_SHOWN
    return f"{message}; and {more} more" if more > 0 else message


def predictor(task: str, path: Path) -> Any:
    from training import predict

    if task == "generation":
        return predict.GenerationPredictor(path, max_seconds=get_settings().generation_max_seconds)
    classes = {"classification": predict.ClassificationPredictor, "ner": predict.NerPredictor}
    return classes[task](path)
