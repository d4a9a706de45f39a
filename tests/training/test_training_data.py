"""read_jsonl, infer_task and validate_classification report problems by exact line number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from training.data import DataError, infer_task, read_jsonl, validate_classification


def write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    return path


def test_read_jsonl_keeps_line_numbers_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, b'{"text": "a", "label": 1}\n\n   \n{"text": "caf\xc3\xa9", "label": "x"}\r\n')
    assert read_jsonl(path) == [(1, {"text": "a", "label": 1}), (4, {"text": "café", "label": "x"})]


def test_read_jsonl_accepts_byte_order_mark(tmp_path: Path) -> None:
    path = write(tmp_path, b'\xef\xbb\xbf{"text": "a"}\n')
    assert read_jsonl(path) == [(1, {"text": "a"})]


def test_read_jsonl_reports_each_problem_with_its_line(tmp_path: Path) -> None:
    content = b'{"ok": 1}\n\n{"broken": \n[1, 2]\n{"text": "\xff\xfe"}\n"just a string"\n{"ok": 2}\n'
    with pytest.raises(DataError) as caught:
        read_jsonl(write(tmp_path, content))
    problems = caught.value.problems
    assert len(problems) == 4
    assert problems[0].startswith("line 3: not valid JSON (")
    assert problems[1:] == [
        "line 4: expected a JSON object",
        "line 5: not valid UTF-8",
        "line 6: expected a JSON object",
    ]
    assert str(caught.value).startswith("line 3: not valid JSON")
    assert "line 6: expected a JSON object" in str(caught.value)


def test_read_jsonl_caps_problems(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        read_jsonl(write(tmp_path, b"nope\n" * 50), max_problems=3)
    assert [p.split(":")[0] for p in caught.value.problems] == ["line 1", "line 2", "line 3"]


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n"])
def test_read_jsonl_empty_file(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(DataError) as caught:
        read_jsonl(write(tmp_path, content))
    assert caught.value.problems == ["the file has no rows"]


def test_data_error_message_shows_the_first_few() -> None:
    error = DataError([f"line {i}: bad" for i in range(1, 9)])
    assert str(error) == "line 1: bad; line 2: bad; line 3: bad; line 4: bad; line 5: bad; and 3 more"


@pytest.mark.parametrize(
    ("row", "task"),
    [
        ({"text": "hi", "label": "a"}, "classification"),
        ({"tokens": ["a"], "tags": ["O"]}, "ner"),
        ({"prompt": "q", "completion": "a"}, "generation"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "generation"),
        ({"text": "just text"}, "generation"),
    ],
)
def test_infer_task(row: dict[str, Any], task: str) -> None:
    assert infer_task([(1, row), (2, row)]) == task


def test_infer_task_majority_and_unknown() -> None:
    rows: list[tuple[int, dict[str, Any]]] = [
        (1, {"text": "a", "label": 1}),
        (2, {"text": "b"}),
        (3, {"text": "c", "label": 0}),
    ]
    assert infer_task(rows) == "classification"
    with pytest.raises(DataError) as caught:
        infer_task([(7, {"foo": 1, "bar": 2})])
    assert caught.value.problems[0].startswith('line 7: cannot tell the task from the keys ("foo", "bar")')


def test_validate_classification_problems_by_line() -> None:
    rows: list[tuple[int, dict[str, Any]]] = [
        (1, {"text": "good", "label": "pos"}),
        (2, {"label": "pos"}),
        (3, {"text": 5, "label": "neg"}),
        (4, {"text": "  ", "label": "neg"}),
        (5, {"text": "fine"}),
        (6, {"text": "fine", "label": True}),
        (7, {"text": "fine", "label": 1.5}),
        (8, {"text": "fine", "label": "neg", "text_pair": 3}),
        (9, {"text": "fine", "label": ""}),
        (17, {"text": "ok", "label": "neg", "text_pair": "context"}),
    ]
    assert validate_classification(rows) == [
        'line 2: "text" is missing',
        'line 3: "text" must be a string',
        'line 4: "text" is empty',
        'line 5: "label" is missing',
        'line 6: "label" must be a string or an integer',
        'line 7: "label" must be a string or an integer',
        'line 8: "text_pair" must be a string',
        'line 9: "label" is empty',
    ]


def test_validate_classification_ok_and_single_label() -> None:
    ok: list[tuple[int, dict[str, Any]]] = [
        (1, {"text": "a", "label": 0}), (2, {"text": "b", "label": "1"}),
        (3, {"text": "c", "label": 0}), (4, {"text": "d", "label": "1"}),
    ]
    assert validate_classification(ok) == []
    problems = validate_classification([(1, {"text": "a", "label": 3}), (2, {"text": "b", "label": 3})])
    assert problems == ['every row has the label "3"; classification needs at least 2 distinct labels']


def test_validate_classification_caps_problems() -> None:
    rows = [(i, {"label": "a"}) for i in range(1, 100)]
    assert len(validate_classification(rows, max_problems=5)) == 5


def test_a_label_seen_once_is_named_with_its_line() -> None:
    rows = [(1, {"text": "good", "label": "pos"}), (2, {"text": "bad", "label": "neg"}),
            (3, {"text": "fine", "label": "pos"}), (4, {"text": "awful", "label": "neg"}),
            (5, {"text": "meh", "label": "nuetral"})]
    expected = 'line 5: label "nuetral" appears only once; each label needs at least 2 rows'
    assert validate_classification(rows) == [expected]


def _peak_bytes(call: Any) -> tuple[Any, int]:
    import tracemalloc

    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("task", ["classification", "ner", "generation"])
def test_validation_streams_the_file_holding_one_row_at_a_time(tmp_path: Path, task: str) -> None:
    from tasks import recipes

    rows = {
        "classification": lambda i: {"text": f"sentence number {i} " * 4, "label": "pos" if i % 2 else "neg"},
        "ner": lambda i: {"tokens": ["Mary", "met", f"Bob{i}", "in", "Paris"],
                          "tags": ["B-PER", "O", "B-PER", "O", "B-LOC"]},
        "generation": lambda i: {"prompt": f"question {i} " * 4, "completion": f" answer {i}"},
    }[task]
    path = tmp_path / "big.jsonl"
    with path.open("w") as handle:
        for i in range(40_000):
            handle.write(json.dumps(rows(i)) + "\n")
    size = path.stat().st_size
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(rows(i)) + "\n" for i in range(4)))
    recipes.check_rows(small, None, [task])  # the modules it imports are not the file's memory

    (checked_task, count), streamed = _peak_bytes(lambda: recipes.check_rows(path, None, [task]))
    (loaded_task, loaded), held = _peak_bytes(lambda: recipes.load_rows(path, None, [task]))
    assert (checked_task, count) == (loaded_task, len(loaded)) == (task, 40_000)
    # Loading holds every row (several times the file's bytes); validation a few rows' worth, whatever the size.
    assert held > size
    assert streamed < size / 20, (streamed, size)


def test_streamed_validation_names_the_same_lines_as_loading(tmp_path: Path) -> None:
    from tasks import recipes

    lines = [json.dumps({"text": f"t{i}", "label": "a" if i % 2 else "b"}) for i in range(30)]
    lines[7] = json.dumps({"text": "", "label": "a"})
    lines[12] = "[[[[" * 10_000
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as streamed:
        recipes.check_rows(path, None, ["classification"])
    with pytest.raises(DataError) as loaded:
        recipes.load_rows(path, None, ["classification"])
    # The read problem (line 13) is reported first, before any row is checked; both paths agree.
    assert streamed.value.problems == loaded.value.problems == ["line 13: nested too deeply"]
    lines[12] = json.dumps({"text": "ok", "label": "a"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as streamed:
        recipes.check_rows(path, None, ["classification"])
    assert streamed.value.problems == ['line 8: "text" is empty']
