"""validate_generation: prompt/completion, messages and text rows, problems by exact line."""

from __future__ import annotations

from training.data import Row, infer_task, validate_generation


def test_valid_rows_of_every_form() -> None:
    rows: list[Row] = [
        (1, {"prompt": "2+2=", "completion": "4"}),
        (2, {"prompt": "", "completion": "anything"}),
        (3, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        (4, {"messages": [{"role": "system", "content": ""}, {"role": "assistant", "content": "x"}]}),
        (5, {"text": "free text"}),
    ]
    assert validate_generation(rows) == []
    assert infer_task(rows) == "generation"


def test_problems_by_line() -> None:
    rows: list[Row] = [
        (1, {"prompt": "ok", "completion": "fine"}),
        (2, {"prompt": "no completion"}),
        (3, {"completion": "no prompt"}),
        (4, {"prompt": 3, "completion": "x"}),
        (5, {"prompt": "x", "completion": ""}),
        (6, {"prompt": "x", "completion": ["a"]}),
        (7, {"messages": []}),
        (8, {"messages": "hi"}),
        (9, {"messages": [{"role": "user", "content": "hi"}]}),
        (10, {"messages": [{"role": "bot", "content": "hi"}, "x", {"role": "assistant", "content": 5}]}),
        (11, {"messages": [{"content": "hi"}, {"role": "assistant"}]}),
        (12, {"text": ""}),
        (13, {"text": 7}),
        (14, {"foo": "bar"}),
    ]
    assert validate_generation(rows) == [
        'line 2: "completion" is missing',
        'line 3: "prompt" is missing',
        'line 4: "prompt" must be a string',
        'line 5: "completion" is empty',
        'line 6: "completion" must be a string',
        'line 7: "messages" must be a non-empty list',
        'line 8: "messages" must be a non-empty list',
        'line 9: "messages" has no assistant message to learn from',
        'line 10: messages[0].role must be "system", "user" or "assistant"',
        "line 10: messages[1] must be an object",
        "line 10: messages[2].content must be a string",
        'line 11: messages[0].role must be "system", "user" or "assistant"',
        "line 11: messages[1].content must be a string",
        'line 12: "text" is empty',
        'line 13: "text" must be a string',
        'line 14: expected "prompt" and "completion", "messages" or "text"',
    ]


def test_empty_file_and_cap() -> None:
    assert validate_generation([]) == ["the file has no rows"]
    rows: list[Row] = [(i, {"text": 1}) for i in range(1, 40)]
    assert len(validate_generation(rows, max_problems=5)) == 5
