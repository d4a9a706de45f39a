"""NER data: CoNLL reading, row checks by exact line, tag-scheme detection and IOB2 normalisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from training.conll import read_conll
from training.data import (
    DataError,
    Row,
    detect_tag_scheme,
    infer_task,
    looks_like_conll,
    normalise_tags,
    random_split,
    validate_ner,
)

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER


-DOCSTART- -X- -X- O
BRUSSELS\tNNP\tB-NP\tB-LOC
1996-08-22 CD I-NP O
"""


def write(tmp_path: Path, text: str, name: str = "data.conll") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_read_conll_sentences_with_first_line_numbers(tmp_path: Path) -> None:
    rows = read_conll(write(tmp_path, CONLL))
    assert rows == [
        (3, {"tokens": ["EU", "rejects", "German", "call", "."], "tags": ["B-ORG", "O", "B-MISC", "O", "O"]}),
        (9, {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}),
        (14, {"tokens": ["BRUSSELS", "1996-08-22"], "tags": ["B-LOC", "O"]}),
    ]


def test_read_conll_two_columns_bom_crlf_and_no_final_blank_line(tmp_path: Path) -> None:
    path = tmp_path / "two.conll"
    path.write_bytes(b"\xef\xbb\xbfAnna B-PER\r\nsings O\r\n\r\n  \r\nRome B-LOC")
    assert read_conll(path) == [
        (1, {"tokens": ["Anna", "sings"], "tags": ["B-PER", "O"]}),
        (5, {"tokens": ["Rome"], "tags": ["B-LOC"]}),
    ]


def test_read_conll_reports_problems_by_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.conll"
    path.write_bytes(b"Anna B-PER\nsings\n\nRome B-LOC\n\xff\xfe O\nlonely\n")
    with pytest.raises(DataError) as caught:
        read_conll(path)
    assert caught.value.problems == [
        "line 2: expected at least 2 columns",
        "line 5: not valid UTF-8",
        "line 6: expected at least 2 columns",
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "-DOCSTART- O\n\n"])
def test_read_conll_without_sentences(tmp_path: Path, text: str) -> None:
    with pytest.raises(DataError, match="no sentences"):
        read_conll(write(tmp_path, text))


def test_looks_like_conll(tmp_path: Path) -> None:
    assert looks_like_conll(write(tmp_path, CONLL, "a.conll"))
    assert looks_like_conll(write(tmp_path, "Anna B-PER\nbroken\nRome B-LOC\n", "b.txt"))
    assert not looks_like_conll(write(tmp_path, '{"tokens": ["a"], "tags": ["O"]}\n', "c.jsonl"))
    assert not looks_like_conll(write(tmp_path, '\n\n  {"text": "a b c"}\n', "d.jsonl"))
    assert not looks_like_conll(write(tmp_path, "one\ntwo\nthree\n", "e.txt"))
    assert not looks_like_conll(write(tmp_path, "", "f.txt"))


def test_infer_task_still_reads_tokens_and_tags_as_ner(tmp_path: Path) -> None:
    assert infer_task(read_conll(write(tmp_path, CONLL))) == "ner"


def test_validate_ner_problems_by_line() -> None:
    rows: list[Row] = [
        (1, {"tokens": ["Anna", "sings"], "tags": ["B-PER", "O"]}),
        (2, {"tags": ["O"]}),
        (3, {"tokens": "Anna sings", "tags": ["B-PER", "O"]}),
        (4, {"tokens": ["Anna"], "tags": ["X-PER"]}),
        (5, {"tokens": [], "tags": []}),
        (6, {"tokens": ["Anna", " "], "tags": ["B-PER", "O"]}),
        (7, {"tokens": ["Anna", 3], "tags": ["B-PER", "O"]}),
        (8, {"tokens": ["Anna"]}),
        (9, {"tokens": ["a"], "tags": [None]}),
        (17, {"tokens": ["a", "b", "c", "d", "e", "f"], "tags": ["O"] * 5}),
        (18, {"tokens": ["a"], "tags": ["b-per"]}),
        (19, {"tokens": ["a"], "tags": ["PER"]}),
    ]
    assert validate_ner(rows) == [
        'line 2: "tokens" is missing',
        'line 3: "tokens" must be a list of strings',
        'line 4: tag "X-PER" is not IOB1, IOB2 or BIOES',
        'line 5: "tokens" is empty',
        'line 6: "tokens" item 2 is empty',
        'line 7: "tokens" must be a list of strings',
        'line 8: "tags" is missing',
        'line 9: "tags" must be a list of strings',
        'line 17: "tags" has 5 items, "tokens" has 6',
        'line 18: tag "b-per" is not IOB1, IOB2 or BIOES',
        'line 19: tag "PER" is not IOB1, IOB2 or BIOES',
    ]


def test_validate_ner_caps_problems_and_empty_file() -> None:
    assert validate_ner([]) == ["the file has no rows"]
    rows: list[Row] = [(i, {"tokens": ["a"]}) for i in range(1, 50)]
    assert len(validate_ner(rows, max_problems=4)) == 4


def rows_of(*tag_lists: list[str]) -> list[Row]:
    return [(i, {"tokens": [f"w{j}" for j in range(len(tags))], "tags": tags}) for i, tags in enumerate(tag_lists, 1)]


@pytest.mark.parametrize(
    ("tag_lists", "scheme"),
    [
        ([["B-PER", "I-PER", "O"], ["O", "B-LOC"]], "IOB2"),
        ([["O", "O"], ["B-PER", "O"]], "IOB2"),
        ([["O"]], "IOB2"),
        ([["I-PER", "I-PER", "O"], ["O", "I-LOC", "B-LOC"]], "IOB1"),
        ([["B-PER", "I-PER", "O"], ["I-LOC", "O"]], "IOB1"),
        ([["B-PER", "E-PER", "O"], ["S-LOC"], ["B-ORG", "I-ORG", "E-ORG"]], "BIOES"),
        ([["O"], ["S-LOC", "O"]], "BIOES"),
    ],
)
def test_detect_tag_scheme(tag_lists: list[list[str]], scheme: str) -> None:
    rows = rows_of(*tag_lists)
    assert detect_tag_scheme(rows) == scheme
    assert validate_ner(rows) == []


def test_a_file_mixing_schemes_is_a_problem() -> None:
    rows = rows_of(["O", "O"], ["S-LOC", "O"], ["O"], ["I-PER", "O"])
    expected = ["line 4: the tags are IOB1, but line 2 uses BIOES; a file must use one tag scheme"]
    assert validate_ner(rows) == expected
    with pytest.raises(DataError) as caught:
        detect_tag_scheme(rows)
    assert caught.value.problems == expected
    # An IOB2 row of single-token entities cannot be BIOES, which would write S-.
    assert validate_ner(rows_of(["B-PER", "E-PER"], ["B-LOC", "O"])) == [
        "line 2: the tags are IOB2, but line 1 uses BIOES; a file must use one tag scheme"
    ]


def test_broken_bioes_order_is_a_problem() -> None:
    assert validate_ner(rows_of(["O"], ["B-PER", "O", "S-LOC"], ["O", "E-LOC"], ["B-PER", "E-LOC"])) == [
        'line 2: tag "B-PER" (token 1) must be followed by "I-PER" or "E-PER" in BIOES',
        'line 3: tag "E-LOC" (token 2) must follow "B-LOC" or "I-LOC" in BIOES',
        'line 4: tag "B-PER" (token 1) must be followed by "I-PER" or "E-PER" in BIOES',
    ]


@pytest.mark.parametrize(
    ("tags", "scheme", "iob2"),
    [
        (
            ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC"],
            "IOB1",
            ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"],
        ),
        (["I-PER", "I-LOC", "I-LOC"], "IOB1", ["B-PER", "B-LOC", "I-LOC"]),
        (
            ["B-PER", "I-PER", "E-PER", "O", "S-LOC", "S-LOC"],
            "BIOES",
            ["B-PER", "I-PER", "I-PER", "O", "B-LOC", "B-LOC"],
        ),
        (["B-ORG", "E-ORG", "S-ORG", "B-ORG", "E-ORG"], "BIOES", ["B-ORG", "I-ORG", "B-ORG", "B-ORG", "I-ORG"]),
        (["B-PER", "I-PER", "O", "B-LOC"], "IOB2", ["B-PER", "I-PER", "O", "B-LOC"]),
        (["O", "I-PER"], "IOB2", ["O", "B-PER"]),
        ([], "IOB2", []),
    ],
)
def test_normalise_tags(tags: list[str], scheme: Any, iob2: list[str]) -> None:
    assert normalise_tags(tags, scheme) == iob2


def test_normalise_tags_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown tag scheme"):
        normalise_tags(["O"], "BILOU")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='tag "X-PER"'):
        normalise_tags(["X-PER"], "IOB2")


def test_random_split() -> None:
    rows = [{"i": i} for i in range(20)]
    train, held = random_split(rows, 0.25, seed=3)
    assert (len(train), len(held)) == (15, 5)
    assert sorted(r["i"] for r in train + held) == list(range(20))
    assert random_split(rows, 0.25, seed=3) == (train, held)
    assert random_split(rows[:2], 0.01, seed=0)[1] != []
    assert random_split(rows[:1], 0.5, seed=0) == (rows[:1], [])
    assert random_split(rows, 0.0, seed=0)[1] == []
