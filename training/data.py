"""Reading and checking training files (JSON Lines), with problems reported by 1-based line number.

A row is kept with its line number: ``Row = tuple[int, dict[str, Any]]``, so later checks can point
at the line a user must fix.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal

Row = tuple[int, dict[str, Any]]

# str(DataError) shows this many problems; the full list stays on `.problems`.
_SHOWN_IN_MESSAGE = 5

TASK_CLASSIFICATION = "classification"
TASK_NER = "ner"
TASK_GENERATION = "generation"
# A CoNLL line whose first column is this marks a document boundary, not a token.
CONLL_DOCSTART = "-DOCSTART-"


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


# One line of a training file is at most this long (a request body's cap): reading is line by line, and a
# file that is one line of gigabytes must not become one string of gigabytes.
MAX_LINE_BYTES = 8 * 1024 * 1024
_SKIP_CHUNK = 1024 * 1024


def numbered_lines(handle: IO[bytes], max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """Each line as ``(line number, bytes)``; a line longer than ``max_bytes`` comes as ``None``, its bytes
    skipped in bounded reads, never held whole."""
    number = 0
    while raw := handle.readline(max_bytes + 1):
        number += 1
        if len(raw) > max_bytes:
            while not raw.endswith(b"\n"):
                raw = handle.readline(_SKIP_CHUNK)
                if not raw:
                    break
            yield number, None
            continue
        yield number, raw


def too_long(line_number: int) -> str:
    return f"line {line_number}: longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB"


def read_jsonl(path: Path, max_problems: int = 10) -> list[Row]:
    """Read one JSON object per line as `(line_number, object)` pairs; raise DataError listing problems."""
    rows = list(iter_jsonl(path, max_problems))
    if not rows:
        raise DataError(["the file has no rows"])
    return rows


def iter_jsonl(path: Path, max_problems: int = 10) -> Iterator[Row]:
    """`read_jsonl` one row at a time, holding one line: the problems are raised (DataError) once the file
    has been read, or as soon as `max_problems` are found."""
    problems: list[str] = []
    with open(path, "rb") as handle:
        for line_number, raw in numbered_lines(handle):
            if len(problems) >= max_problems:
                break
            if raw is None:
                problems.append(too_long(line_number))
                continue
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
            except RecursionError:
                # `[[[[…`: the decoder recurses once per level and gives up at the interpreter's limit.
                problems.append(f"line {line_number}: nested too deeply")
                continue
            if not isinstance(value, dict):
                problems.append(f"line {line_number}: expected a JSON object")
                continue
            if not problems:  # past the first problem the rows are only read for the report
                yield line_number, value
    if problems:
        raise DataError(problems)


def _row_task(row: dict[str, Any]) -> str | None:
    if "text" in row and "label" in row:
        return TASK_CLASSIFICATION
    if "tokens" in row and "tags" in row:
        return TASK_NER
    if ("prompt" in row and "completion" in row) or "messages" in row or "text" in row:
        return TASK_GENERATION
    return None


class Survey:
    """What one pass over a file's rows tells before validation: how many, their likely task, the first
    DPO preference pair. Holds counts, not rows."""

    def __init__(self) -> None:
        self.rows = 0
        self.first: Row | None = None
        self.first_preference_line: int | None = None
        self._tasks: dict[str, int] = {}

    def add(self, line: int, row: dict[str, Any]) -> None:
        self.rows += 1
        if self.first is None:
            self.first = (line, {key: None for key in list(row)[:8]})  # the keys, for the error message
        if self.first_preference_line is None and is_preference_row(row):
            self.first_preference_line = line
        task = _row_task(row)
        if task is not None:
            self._tasks[task] = self._tasks.get(task, 0) + 1

    def task(self) -> str:
        """"classification", "ner" or "generation" from the rows' keys (the majority wins)."""
        if self.first is None:
            raise DataError(["the file has no rows"])
        if not self._tasks:
            line, first = self.first
            keys = ", ".join(f'"{k}"' for k in first) or "no keys"
            raise DataError(
                [
                    f"line {line}: cannot tell the task from the keys ({keys}); expected "
                    '"text" and "label" (classification), "tokens" and "tags" (ner), or '
                    '"prompt" and "completion", "messages" or "text" (generation)'
                ]
            )
        # Ties go to the more specific task: a labelled row is also a text row.
        priority = [TASK_CLASSIFICATION, TASK_NER, TASK_GENERATION]
        return max(self._tasks, key=lambda task: (self._tasks[task], -priority.index(task)))


def infer_task(rows: Iterable[Row]) -> str:
    """Return "classification", "ner" or "generation" from the rows' keys (the majority wins)."""
    survey = Survey()
    for line, row in rows:
        survey.add(line, row)
    return survey.task()


def validate_classification(rows: Iterable[Row], max_problems: int = 20) -> list[str]:
    """Check text/label rows; return problems (empty when the rows are usable for classification)."""
    problems: list[str] = []
    labels: set[str] = set()
    # Per label: its first line and how many rows have it (not every line: the rows may be millions).
    seen: dict[str, tuple[int, int]] = {}
    count = 0
    for line, row in rows:
        count += 1
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
            first, n = seen.get(str(label), (line, 0))
            seen[str(label)] = (first, n + 1)
        if "text_pair" in row and not isinstance(row["text_pair"], str):
            row_problems.append(f'line {line}: "text_pair" must be a string')
        problems.extend(row_problems)
        if len(problems) >= max_problems:
            return problems[:max_problems]
    if not count:
        return ["the file has no rows"]
    # A label with one example can be trained on or evaluated on, never both: almost always a typo.
    for name, (first, n) in seen.items():
        if n == 1 and len(labels) > 1:
            problems.append(f'line {first}: label "{name}" appears only once; each label needs at least 2 rows')
    if len(labels) == 1:
        (only,) = labels
        problems.append(f'every row has the label "{only}"; classification needs at least 2 distinct labels')
    elif not labels and not problems:
        problems.append("no row has a usable label")
    return problems


def random_split(
    rows: list[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split rows into (train, eval), holding out about `eval_fraction` of them (at least one when possible)."""
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    n_eval = 0
    if eval_fraction > 0 and len(shuffled) > 1:
        n_eval = min(len(shuffled) - 1, max(1, round(len(shuffled) * eval_fraction)))
    return shuffled[n_eval:], shuffled[:n_eval]


# --- NER -----------------------------------------------------------------------------------------

TagScheme = Literal["IOB1", "IOB2", "BIOES"]
TAG_SCHEMES: tuple[TagScheme, ...] = ("IOB1", "IOB2", "BIOES")
# When rows fit several schemes (e.g. only single-token B- entities), the first one here wins.
_SCHEME_PREFERENCE: tuple[TagScheme, ...] = ("IOB2", "BIOES", "IOB1")
_TAG_RE = re.compile(r"^([BIES])-(.+)$")


def _split_tag(tag: str) -> tuple[str, str] | None:
    """Return (prefix, type) for "O" ("O", "") or "B-PER" ("B", "PER"); None for anything else."""
    if tag == "O":
        return ("O", "")
    match = _TAG_RE.match(tag)
    return (match.group(1), match.group(2)) if match else None


def _bioes_violation(parts: list[tuple[str, str]]) -> str | None:
    """Describe the first tag that breaks BIOES order (B/I continue with I/E of the same type), or None."""
    for i, (prefix, kind) in enumerate(parts):
        prev = parts[i - 1] if i > 0 else ("O", "")
        nxt = parts[i + 1] if i + 1 < len(parts) else ("O", "")
        tag = f"{prefix}-{kind}"
        if prefix in ("I", "E") and not (prev[0] in ("B", "I") and prev[1] == kind):
            return f'tag "{tag}" (token {i + 1}) must follow "B-{kind}" or "I-{kind}" in BIOES'
        if prefix in ("B", "I") and not (nxt[0] in ("I", "E") and nxt[1] == kind):
            return f'tag "{tag}" (token {i + 1}) must be followed by "I-{kind}" or "E-{kind}" in BIOES'
    return None


def _row_schemes(parts: list[tuple[str, str]]) -> tuple[set[TagScheme], str | None]:
    """Return the schemes one row's tags fit, and why they fit none when the set is empty."""
    if all(prefix == "O" for prefix, _ in parts):
        return set(TAG_SCHEMES), None
    if any(prefix in ("E", "S") for prefix, _ in parts):
        violation = _bioes_violation(parts)
        return (set(), violation) if violation else ({"BIOES"}, None)
    # IOB2 opens every entity with B-; IOB1 may open one with I- (B- only splits adjacent same-type entities).
    opens_with_i = any(
        prefix == "I" and not (i > 0 and parts[i - 1][0] in ("B", "I") and parts[i - 1][1] == kind)
        for i, (prefix, kind) in enumerate(parts)
    )
    return ({"IOB1"} if opens_with_i else {"IOB1", "IOB2"}), None


def _best_scheme(schemes: set[TagScheme]) -> TagScheme:
    return next(s for s in _SCHEME_PREFERENCE if s in schemes)


def _check_tag_lists(line: int, row: dict[str, Any]) -> tuple[list[str], list[tuple[str, str]] | None]:
    """Return (problems, parsed tags) for one row; parsed tags are None when the row has problems."""
    problems: list[str] = []
    for key in ("tokens", "tags"):
        value = row.get(key)
        if key not in row:
            problems.append(f'line {line}: "{key}" is missing')
        elif not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            problems.append(f'line {line}: "{key}" must be a list of strings')
    if problems:
        return problems, None
    tokens: list[str] = row["tokens"]
    tags: list[str] = row["tags"]
    if not tokens:
        return [f'line {line}: "tokens" is empty'], None
    blank = next((i for i, token in enumerate(tokens) if not token.strip()), None)
    if blank is not None:
        problems.append(f'line {line}: "tokens" item {blank + 1} is empty')
    if len(tags) != len(tokens):
        problems.append(f'line {line}: "tags" has {len(tags)} items, "tokens" has {len(tokens)}')
    parts = [_split_tag(tag) for tag in tags]
    bad = next((tag for tag, part in zip(tags, parts, strict=True) if part is None), None)
    if bad is not None:
        problems.append(f'line {line}: tag "{bad}" is not IOB1, IOB2 or BIOES')
    if problems:
        return problems, None
    return [], [part for part in parts if part is not None]


class _SchemeCheck:
    """Checks, row by row, that every row fits one common tag scheme."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.common: set[TagScheme] = set(TAG_SCHEMES)
        # The first line that ruled each scheme out, to name it when a later line needs that scheme.
        self._ruled_out_at: dict[TagScheme, int] = {}

    def add(self, line: int, parts: list[tuple[str, str]]) -> None:
        fits, why = _row_schemes(parts)
        if not fits:
            self.problems.append(f"line {line}: {why}")
            return
        if not fits & self.common:
            earlier = min(self._ruled_out_at[s] for s in fits)
            self.problems.append(
                f"line {line}: the tags are {_best_scheme(fits)}, but line {earlier} uses "
                f"{_best_scheme(self.common)}; a file must use one tag scheme"
            )
            return
        for scheme in self.common - fits:
            self._ruled_out_at[scheme] = line
        self.common &= fits


def validate_ner(rows: Iterable[Row], max_problems: int = 20) -> list[str]:
    """Check tokens/tags rows and their tag scheme; return problems (empty when usable for NER)."""
    problems: list[str] = []
    schemes = _SchemeCheck()
    count = 0
    for line, row in rows:
        count += 1
        row_problems, parts = _check_tag_lists(line, row)
        problems.extend(row_problems)
        if parts is not None:
            schemes.add(line, parts)
        if len(problems) >= max_problems:
            return problems[:max_problems]
    if not count:
        return ["the file has no rows"]
    problems.extend(schemes.problems)
    return problems[:max_problems]


def detect_tag_scheme(rows: Iterable[Row]) -> TagScheme:
    """Return the one tag scheme all rows fit ("IOB2" when several do); raise DataError if none does."""
    problems: list[str] = []
    schemes = _SchemeCheck()
    for line, row in rows:
        row_problems, parts = _check_tag_lists(line, row)
        problems.extend(row_problems)
        if parts is not None:
            schemes.add(line, parts)
    problems.extend(schemes.problems)
    if problems:
        raise DataError(problems)
    return _best_scheme(schemes.common)


def normalise_tags(tags: Sequence[str], scheme: TagScheme) -> list[str]:
    """Rewrite tags of `scheme` as IOB2: every entity opens with B-, continues with I-."""
    if scheme not in TAG_SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r}; expected one of {', '.join(TAG_SCHEMES)}")
    out: list[str] = []
    prev_prefix, prev_kind = "O", ""
    for tag in tags:
        part = _split_tag(tag)
        if part is None:
            raise ValueError(f'tag "{tag}" is not IOB1, IOB2 or BIOES')
        prefix, kind = part
        if prefix == "O":
            out.append("O")
        elif prefix in ("B", "S"):
            out.append(f"B-{kind}")
        elif prev_prefix in ("B", "I") and prev_kind == kind:
            # I- or E- inside an open entity of the same type continues it.
            out.append(f"I-{kind}")
        else:
            # An I- (or E-) that opens an entity: IOB1 style, and lenient for the other schemes.
            out.append(f"B-{kind}")
        # S- and E- close their entity, so a following I- must open a new one.
        prev_prefix, prev_kind = ("O", "") if prefix in ("S", "E") else (prefix, kind)
    return out


def looks_like_conll(path: Path, sample_lines: int = 50) -> bool:
    """Guess whether `path` is a CoNLL column file rather than JSON Lines, from its first lines."""
    seen = 0
    columnar = 0
    with open(path, "rb") as handle:
        for _, raw in numbered_lines(handle):
            if raw is None:
                return False  # no CoNLL line is that long; JSON Lines reading will name the line
            text = raw.decode("utf-8", errors="replace").lstrip("\ufeff").strip()
            if not text:
                continue
            if seen == 0 and text.startswith(("{", "[")):
                return False
            seen += 1
            if text.split()[0] == CONLL_DOCSTART or len(text.split()) >= 2:
                columnar += 1
            if seen >= sample_lines:
                break
    # A majority, not all: the reader then names the malformed lines instead of a JSON error on line 1.
    return seen > 0 and columnar * 2 > seen


# --- generation ----------------------------------------------------------------------------------

CHAT_ROLES = ("system", "user", "assistant")


def _check_messages(line: int, messages: Any) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f'line {line}: "messages" must be a non-empty list']
    problems: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"line {line}: messages[{i}] must be an object")
            continue
        if message.get("role") not in CHAT_ROLES:
            problems.append(f'line {line}: messages[{i}].role must be "system", "user" or "assistant"')
        if not isinstance(message.get("content"), str):
            problems.append(f"line {line}: messages[{i}].content must be a string")
    if not problems and not any(m["role"] == "assistant" for m in messages):
        problems.append(f'line {line}: "messages" has no assistant message to learn from')
    return problems


def _check_generation_row(line: int, row: dict[str, Any]) -> list[str]:
    if "messages" in row:
        return _check_messages(line, row["messages"])
    if "prompt" in row or "completion" in row:
        problems: list[str] = []
        if "prompt" not in row:
            problems.append(f'line {line}: "prompt" is missing')
        elif not isinstance(row["prompt"], str):
            problems.append(f'line {line}: "prompt" must be a string')
        if "completion" not in row:
            problems.append(f'line {line}: "completion" is missing')
        elif not isinstance(row["completion"], str):
            problems.append(f'line {line}: "completion" must be a string')
        elif not row["completion"]:
            problems.append(f'line {line}: "completion" is empty')
        return problems
    if "text" in row:
        if not isinstance(row["text"], str):
            return [f'line {line}: "text" must be a string']
        return [f'line {line}: "text" is empty'] if not row["text"].strip() else []
    return [f'line {line}: expected "prompt" and "completion", "messages" or "text"']


def validate_generation(rows: Iterable[Row], max_problems: int = 20) -> list[str]:
    """Check prompt/completion, messages or text rows; return problems (empty when usable)."""
    return _check_each_row(rows, _check_generation_row, max_problems)


def _check_each_row(rows: Iterable[Row], check: Callable[[int, dict[str, Any]], list[str]],
                    max_problems: int) -> list[str]:
    """`check`'s problems with each row, up to `max_problems`; a file without rows is one problem."""
    problems: list[str] = []
    count = 0
    for line, row in rows:
        count += 1
        problems.extend(check(line, row))
        if len(problems) >= max_problems:
            return problems[:max_problems]
    return problems if count else ["the file has no rows"]


# --- preference pairs (DPO) ----------------------------------------------------------------------

PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")


def is_preference_row(row: dict[str, Any]) -> bool:
    """True for a line in OpenAI's DPO format (it has at least one of its keys)."""
    return any(key in row for key in PREFERENCE_KEYS)


def _check_output(line: int, row: dict[str, Any], key: str) -> list[str]:
    output = row.get(key)
    if (not isinstance(output, list) or len(output) != 1 or not isinstance(output[0], dict)
            or output[0].get("role") != "assistant"):
        return [f'line {line}: "{key}" must be a list with one assistant message']
    if not isinstance(output[0].get("content"), str) or not output[0]["content"]:
        return [f'line {line}: "{key}"[0].content must be a non-empty string']
    return []


def _check_preference_row(line: int, row: dict[str, Any]) -> list[str]:
    missing = [key for key in PREFERENCE_KEYS if key not in row]
    if missing:
        return [f'line {line}: a DPO line needs "input", "preferred_output" and "non_preferred_output"; '
                f"missing {', '.join(repr(k) for k in missing)}"]
    problems: list[str] = []
    prompt = row["input"]
    if not isinstance(prompt, dict) or "messages" not in prompt:
        problems.append(f'line {line}: "input" must be an object with "messages"')
    else:
        messages = prompt["messages"]
        found = _check_messages(line, messages)
        # The prompt needs no assistant turn: the outputs are the replies being compared.
        problems.extend(p.replace('"messages"', '"input.messages"').replace("messages[", "input.messages[")
                        for p in found if "no assistant message" not in p)
    problems.extend(_check_output(line, row, "preferred_output"))
    problems.extend(_check_output(line, row, "non_preferred_output"))
    if not problems and row["preferred_output"][0]["content"] == row["non_preferred_output"][0]["content"]:
        problems.append(f"line {line}: the preferred and non-preferred outputs are the same text")
    return problems


def validate_dpo(rows: Iterable[Row], max_problems: int = 20) -> list[str]:
    """Check preference pairs in OpenAI's DPO format; return problems (empty when usable)."""
    return _check_each_row(rows, _check_preference_row, max_problems)
