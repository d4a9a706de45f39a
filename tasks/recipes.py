"""Each fine-tuning task's reader, validator, hyperparameter defaults, trainer and predictor, in one table.

Imports of torch-heavy modules happen on first use, inside the worker process that needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import get_settings

TASKS = ("classification", "ner", "generation")
MAX_PROBLEMS_SHOWN = 5


@dataclass(frozen=True)
class Recipe:
    validate: Callable[[Iterable[tuple[int, dict[str, Any]]]], list[str]]
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


def iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """`read_rows` one row at a time: the file is read as it is consumed, never held."""
    from training.conll import iter_conll
    from training.data import iter_jsonl, looks_like_conll

    return iter_conll(path) if looks_like_conll(path) else iter_jsonl(path)


def check_rows(path: Path, task: str | None, model_tasks: list[str], method: str = "supervised") -> tuple[str, int]:
    """Validate a file as `load_rows` does, holding one row at a time: (its task, its row count).

    Two passes over the file: one to count its rows and infer the task from their keys, one to check every
    row against that task. A file of a million rows is validated in the memory of one.
    """
    from training.data import Survey

    survey = Survey()
    for line, row in iter_rows(path):
        survey.add(line, row)
    task = _checked_task(survey, task, model_tasks, method)
    _raise_problems(recipe(task, method).validate(iter_rows(path)), survey.rows)
    return task, survey.rows


def load_rows(path: Path, task: str | None, model_tasks: list[str],
              method: str = "supervised") -> tuple[str, list[dict[str, Any]]]:
    """Read, infer the task when not given, and validate; raises DataError with the first problems by line."""
    from training.data import Survey

    numbered = read_rows(path)
    survey = Survey()
    for line, row in numbered:
        survey.add(line, row)
    task = _checked_task(survey, task, model_tasks, method)
    _raise_problems(recipe(task, method).validate(numbered), survey.rows)
    return task, [row for _, row in numbered]


def _checked_task(survey: Any, task: str | None, model_tasks: list[str], method: str) -> str:
    """The file's task (given, or inferred from the survey of its rows), checked against method and model."""
    from training.data import DataError

    if method == "dpo":
        # Preference pairs train a generation model; no other task reads them.
        task = task or "generation"
        if task != "generation":
            raise DataError([f"DPO trains generation models, not {task}"])
    else:
        if survey.first_preference_line is not None:
            raise DataError([f"line {survey.first_preference_line}: this is a DPO preference pair (\"input\", "
                             '"preferred_output", "non_preferred_output"); create the job with method '
                             '{"type": "dpo"} to train on it'])
        task = task or survey.task()
    if task not in model_tasks:
        raise DataError([f"the file holds {task} data, but the model serves {', '.join(model_tasks)}"])
    return task


def _raise_problems(problems: list[str], rows: int) -> None:
    from training.data import DataError

    if problems:
        raise DataError(problems)
    if not rows:
        raise DataError(["the file has no rows"])


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
