"""Reading and checking training files (JSON Lines), with problems reported by 1-based line number.

A row is kept with its line number: ``Row = tuple[int, dict[str, Any]]``, so later checks can point
at the line a user must fix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = tuple[int, dict[str, Any]]

# str(DataError) shows this many problems; the full list stays on `.problems`.
_SHOWN_IN_MESSAGE = 5

TASK_CLASSIFICATION = "classification"
TASK_NER = "ner"
TASK_GENERATION = "generation"


class DataError(Exception):
    """A training file that cannot be used; `problems` holds one message per problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems: list[str] = list(problems) or ["the data is not valid"]
        super().__init__(self._summary())

    def _summary(self) -> str:
        shown = "; ".join(self.problems[:_SHOWN_IN_MESSAGE])
        more = len(self.problems) - _SHOWN_IN_MESSAGE
        return f"{shown}; and {more} more" if more > 0 else shown

    def __str__(self) -> str:
        return self._summary()


def read_jsonl(path: Path, max_problems: int = 10) -> list[Row]:
    """Read one JSON object per line as `(line_number, object)` pairs; raise DataError listing problems."""
    rows: list[Row] = []
    problems: list[str] = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if len(problems) >= max_problems:
                break
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                # Editors on Windows often prepend a byte-order mark; it is not part of the JSON.
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"line {line_number}: not valid UTF-8")
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(f"line {line_number}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(value, dict):
                problems.append(f"line {line_number}: expected a JSON object")
                continue
            rows.append((line_number, value))
    if problems:
        raise DataError(problems)
    if not rows:
        raise DataError(["the file has no rows"])
    return rows


def _row_task(row: dict[str, Any]) -> str | None:
    if "text" in row and "label" in row:
        return TASK_CLASSIFICATION
    if "tokens" in row and "tags" in row:
        return TASK_NER
    if ("prompt" in row and "completion" in row) or "messages" in row or "text" in row:
        return TASK_GENERATION
    return None


def infer_task(rows: Sequence[Row]) -> str:
    """Return "classification", "ner" or "generation" from the rows' keys (the majority wins)."""
    if not rows:
        raise DataError(["the file has no rows"])
    counts: dict[str, int] = {}
    for _, row in rows:
        task = _row_task(row)
        if task is not None:
            counts[task] = counts.get(task, 0) + 1
    if not counts:
        line, first = rows[0]
        keys = ", ".join(f'"{k}"' for k in list(first)[:8]) or "no keys"
        raise DataError(
            [
                f"line {line}: cannot tell the task from the keys ({keys}); expected "
                '"text" and "label" (classification), "tokens" and "tags" (ner), or '
                '"prompt" and "completion", "messages" or "text" (generation)'
            ]
        )
    # Ties go to the more specific task: a labelled row is also a text row.
    priority = [TASK_CLASSIFICATION, TASK_NER, TASK_GENERATION]
    return max(counts, key=lambda task: (counts[task], -priority.index(task)))


def validate_classification(rows: Sequence[Row], max_problems: int = 20) -> list[str]:
    """Check text/label rows; return problems (empty when the rows are usable for classification)."""
    if not rows:
        return ["the file has no rows"]
    problems: list[str] = []
    labels: set[str] = set()
    for line, row in rows:
        row_problems: list[str] = []
        text = row.get("text")
        if "text" not in row:
            row_problems.append(f'line {line}: "text" is missing')
        elif not isinstance(text, str):
            row_problems.append(f'line {line}: "text" must be a string')
        elif not text.strip():
            row_problems.append(f'line {line}: "text" is empty')
        label = row.get("label")
        if "label" not in row:
            row_problems.append(f'line {line}: "label" is missing')
        elif isinstance(label, bool) or not isinstance(label, str | int):
            # bool is a subclass of int, but `true` as a class name is almost always a mistake.
            row_problems.append(f'line {line}: "label" must be a string or an integer')
        elif isinstance(label, str) and not label.strip():
            row_problems.append(f'line {line}: "label" is empty')
        else:
            labels.add(str(label))
        if "text_pair" in row and not isinstance(row["text_pair"], str):
            row_problems.append(f'line {line}: "text_pair" must be a string')
        problems.extend(row_problems)
        if len(problems) >= max_problems:
            return problems[:max_problems]
    if len(labels) == 1:
        (only,) = labels
        problems.append(f'every row has the label "{only}"; classification needs at least 2 distinct labels')
    elif not labels and not problems:
        problems.append("no row has a usable label")
    return problems
