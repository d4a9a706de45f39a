"""Reading CoNLL column files for NER: one token per line, the tag in the last column.

Sentences are separated by blank lines; ``-DOCSTART-`` lines mark document boundaries and are skipped.
Each sentence becomes a row ``{"tokens": [...], "tags": [...]}`` kept with the line number of its
first token, like the JSON Lines rows of ``training.data``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from training.data import CONLL_DOCSTART, DataError, Row, numbered_lines, too_long


def read_conll(path: Path, max_problems: int = 10) -> list[Row]:
    """Read sentences as `(first_line, {"tokens", "tags"})` pairs; raise DataError listing problems."""
    rows = list(iter_conll(path, max_problems))
    if not rows:
        raise DataError(["the file has no sentences"])
    return rows


def iter_conll(path: Path, max_problems: int = 10) -> Iterator[Row]:
    """`read_conll` one sentence at a time; the problems are raised (DataError) once the file has been read,
    or as soon as `max_problems` are found."""
    problems: list[str] = []
    first_line = 0
    tokens: list[str] = []
    tags: list[str] = []

    def end_sentence() -> Row | None:
        nonlocal tokens, tags
        sentence: Row | None = (first_line, {"tokens": tokens, "tags": tags}) if tokens and not problems else None
        tokens, tags = [], []
        return sentence

    with open(path, "rb") as handle:
        for line_number, raw in numbered_lines(handle):
            if len(problems) >= max_problems:
                break
            if raw is None:
                problems.append(too_long(line_number))
                continue
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                # Editors on Windows often prepend a byte-order mark; it is not part of the first token.
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"line {line_number}: not valid UTF-8")
                continue
            columns = text.split()
            if not columns or columns[0] == CONLL_DOCSTART:
                if (sentence := end_sentence()) is not None:
                    yield sentence
                continue
            if len(columns) < 2:
                problems.append(f"line {line_number}: expected at least 2 columns")
                continue
            if not tokens:
                first_line = line_number
            tokens.append(columns[0])
            tags.append(columns[-1])
    if (sentence := end_sentence()) is not None:
        yield sentence
    if problems:
        raise DataError(problems)
