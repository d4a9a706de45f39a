"""NER fine-tuning end to end on tiny-bert: word alignment, seqeval metrics, results CSV and the predictor."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from tests.data import ner_rows
from tests.training.conftest import Recorder
from training.classification import write_results_csv
from training.data import DataError
from training.ner import (
    IGNORE_INDEX,
    NerResult,
    NerSpec,
    compute_ner_metrics,
    encode_ner,
    ner_label_list,
    resolve_hyperparameters,
    train_ner,
)
from training.predict import NerPredictor, group_entities

# A randomly initialised tiny encoder needs a far larger step than a pretrained one.
FAST_HP = {"learning_rate": 3e-3, "n_epochs": 8, "batch_size": 8}


def test_label_list_and_alignment(tiny_bert: Path) -> None:
    rows = [
        {
            "tokens": ["Peter", "Blackburn", "visited", "Brussels-Capital", "."],
            "tags": ["B-PER", "I-PER", "O", "B-LOC", "O"],
        }
    ]
    labels = ner_label_list(rows)
    assert labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    label2id = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    features, starts = encode_ner(tokenizer, rows, label2id, max_length=64)
    pieces = tokenizer.convert_ids_to_tokens(features[0]["input_ids"])
    word_ids = tokenizer(rows[0]["tokens"], is_split_into_words=True).word_ids()
    # "brussels-capital" splits into several sub-tokens: only the first carries B-LOC.
    assert len(pieces) > 7
    for position, (label, word) in enumerate(zip(features[0]["labels"], word_ids, strict=True)):
        first = word is not None and (position == 0 or word_ids[position - 1] != word)
        if first:
            assert label == label2id[rows[0]["tags"][word]]
            assert starts[0][word] == position
        else:
            assert label == IGNORE_INDEX
    assert sum(label != IGNORE_INDEX for label in features[0]["labels"]) == 5
    # Truncation leaves the cut-off words without a position: they are predicted "O".
    _, cut = encode_ner(tokenizer, rows, label2id, max_length=4)
    assert cut[0][:2] == [1, 2] and cut[0][-1] == -1


def test_compute_ner_metrics() -> None:
    truth = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]]
    guess = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O", "B-LOC"]]
    metrics, report = compute_ner_metrics(truth, guess)
    # Entities: PER x2, LOC x2; found PER 1/2 exact, LOC 1/2 exact plus one wrong LOC.
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 4)
    assert metrics["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    assert report["PER"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["LOC"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    empty, nothing = compute_ner_metrics([["O"]], [["O"]])
    assert empty["f1"] == 0.0 and nothing == {}


def test_group_entities_offsets() -> None:
    text = "Mary Jones  met i-x in New York"
    words = [
        ("B-PER", 0.9, 0, 4),
        ("I-PER", 0.7, 5, 10),
        ("O", 0.9, 12, 15),
        ("I-LOC", 0.6, 16, 19),
        ("B-LOC", 0.8, 23, 26),
        ("I-LOC", 0.6, 27, 31),
    ]
    entities = group_entities(text, words)
    assert [(e["entity_group"], e["text"], e["start"], e["end"]) for e in entities] == [
        ("PER", "Mary Jones", 0, 10),
        ("LOC", "i-x", 16, 19),
        ("LOC", "New York", 23, 31),
    ]
    assert entities[0]["score"] == pytest.approx(0.8)
    assert group_entities("", []) == []


@pytest.fixture(scope="module")
def trained(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[NerResult, Recorder]:
    work = tmp_path_factory.mktemp("ner")
    rows = ner_rows(120, seed=1, scheme="BIOES")
    spec = NerSpec(
        base_model_dir=tiny_bert,
        output_dir=work / "model",
        checkpoint_dir=work / "checkpoints",
        train_rows=rows,
        eval_rows=None,
        hyperparameters=resolve_hyperparameters(FAST_HP, len(rows)),
        seed=0,
        eval_fraction=0.25,
    )
    recorder = Recorder()
    return train_ner(spec, recorder), recorder


def test_ner_learns_entities(trained: tuple[NerResult, Recorder]) -> None:
    result, recorder = trained
    assert result.outcome.completed
    # BIOES input is trained as IOB2.
    assert result.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert result.metrics["f1"] >= 0.8
    assert result.metrics["precision"] >= 0.8 and result.metrics["recall"] >= 0.8
    assert set(result.metrics["per_type"]) == {"LOC", "PER"} == set(result.report)
    assert result.metrics["per_type"] == result.report
    assert all(scores["f1"] >= 0.7 for scores in result.report.values())
    # 90 training rows in batches of 8: 12 steps per epoch.
    assert result.outcome.global_step == result.outcome.total_steps == 96
    evaluations = [metrics for _, _, metrics in recorder.evaluations]
    assert len(evaluations) == 8
    for metrics in evaluations:
        assert {"eval_loss", "eval_precision", "eval_recall", "eval_f1", "train_loss"} <= set(metrics)
        assert all(isinstance(value, float) for value in metrics.values())
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"]
    assert evaluations[-1]["eval_f1"] == pytest.approx(result.metrics["f1"])


def test_ner_saves_model_report_and_csv(trained: tuple[NerResult, Recorder], tmp_path: Path) -> None:
    result, _ = trained
    assert result.model_dir is not None
    config = AutoConfig.from_pretrained(result.model_dir)
    assert config.id2label == dict(enumerate(result.labels))
    report = json.loads((result.model_dir / "eval_report.json").read_text())
    assert report["metrics"]["f1"] == pytest.approx(result.metrics["f1"])
    assert report["n_eval"] == 30 and report["labels"] == result.labels
    path = tmp_path / "results.csv"
    write_results_csv(result.outcome.history, result.report, path)
    lines = path.read_text().splitlines()
    blank = lines.index("")
    header = next(csv.reader(lines[:1]))
    assert header[:5] == ["step", "epoch", "train_loss", "learning_rate", "eval_loss"]
    assert {"eval_f1", "eval_precision", "eval_recall"} <= set(header)
    report_rows = list(csv.reader(lines[blank + 1 :]))
    assert report_rows[0] == ["label", "precision", "recall", "f1", "support"]
    assert [row[0] for row in report_rows[1:]] == ["LOC", "PER"]


def test_ner_predictor_finds_entities_with_exact_offsets(trained: tuple[NerResult, Recorder]) -> None:
    result, _ = trained
    assert result.model_dir is not None
    predictor = NerPredictor(result.model_dir, device=torch.device("cpu"))
    texts = [
        "Mary Jones lives in Berlin.",
        "we met  Tom in San Francisco .",
        "nobody went to the market today.",
        "",
        "Anna White flew to Tokyo yesterday, and Café Rome visited.",
    ]
    predictions = predictor.predict(texts, batch_size=2)
    assert len(predictions) == len(texts)
    for text, entities in zip(texts, predictions, strict=True):
        for entity in entities:
            assert entity["text"] == text[entity["start"] : entity["end"]]
            assert 0 < entity["score"] <= 1
    found = [[(e["entity_group"], e["text"]) for e in entities] for entities in predictions]
    assert found[0] == [("PER", "Mary Jones"), ("LOC", "Berlin")]
    assert found[1] == [("PER", "Tom"), ("LOC", "San Francisco")]
    assert found[2] == [] and found[3] == []
    assert ("PER", "Anna White") in found[4] and ("LOC", "Tokyo") in found[4]
    assert predictor.predict([]) == []


def test_ner_predictor_reads_past_the_length_limit(trained: tuple[NerResult, Recorder]) -> None:
    result, _ = trained
    assert result.model_dir is not None
    predictor = NerPredictor(result.model_dir, device=torch.device("cpu"))
    assert predictor.max_length == 128
    text = "nobody went to the market today . " * 30 + "we met Mary Jones in Paris ."
    (entities,) = predictor.predict([text])
    assert [(e["entity_group"], e["text"]) for e in entities] == [("PER", "Mary Jones"), ("LOC", "Paris")]
    assert entities[1]["start"] == text.index("Paris") and entities[1]["end"] == text.index("Paris") + 5


def test_ner_predictor_runs_long_texts_windows_a_bounded_number_at_a_time(
    trained: tuple[NerResult, Recorder],
) -> None:
    from training.predict import WINDOWS_PER_PASS

    result, _ = trained
    assert result.model_dir is not None
    predictor = NerPredictor(result.model_dir, device=torch.device("cpu"))
    passes: list[int] = []
    predictor.model.register_forward_pre_hook(lambda _, args, kwargs: passes.append(len(kwargs["input_ids"])),
                                              with_kwargs=True)
    text = "nobody went to the market today . " * 600 + "we met Mary Jones in Paris ."
    (entities,) = predictor.predict([text, "Tom lives in Rome ."])[:1]
    assert sum(passes) > WINDOWS_PER_PASS, passes  # the long text became more windows than one pass takes
    assert max(passes) <= WINDOWS_PER_PASS
    assert [(e["entity_group"], e["text"]) for e in entities] == [("PER", "Mary Jones"), ("LOC", "Paris")]
    assert entities[1]["start"] == text.index("Paris")


def test_ner_refuses_bad_rows(tiny_bert: Path, tmp_path: Path) -> None:
    spec = NerSpec(
        base_model_dir=tiny_bert,
        output_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "checkpoints",
        train_rows=[{"tokens": ["a", "b"], "tags": ["B-PER"]}, {"tokens": ["c"], "tags": ["S-LOC"]}],
        eval_rows=[{"tokens": ["a"], "tags": ["X"]}],
        hyperparameters={},
        seed=0,
    )
    with pytest.raises(DataError) as caught:
        train_ner(spec, Recorder())
    assert caught.value.problems == [
        'line 1: "tags" has 1 items, "tokens" has 2',
        'validation data: line 1: tag "X" is not IOB1, IOB2 or BIOES',
    ]
