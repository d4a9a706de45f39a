"""Causal-LM fine-tuning on tiny-gpt2: loss masks, length-grouped batches, exact resume, and the predictor."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from tests.data import COLORS, color_rows
from tests.training.conftest import Recorder, assert_same_weights
from training.base_models import BaseModelInfo
from training.data import DataError
from training.generation import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    CausalLMCollator,
    GenerationResult,
    GenerationSpec,
    GroupedBatches,
    encode_generation,
    length_groups,
    resolve_hyperparameters,
    train_generation,
)
from training.predict import GenerationPredictor
from training.trainer import latest_checkpoint

# A randomly initialised tiny decoder needs a large step and many passes to memorise its data.
FAST_HP = {"learning_rate": 3e-3, "n_epochs": 30, "batch_size": 8}


@pytest.fixture(scope="module")
def tiny_gpt2(base_models: dict[str, BaseModelInfo]) -> Path:
    return base_models["tiny-gpt2"].path


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_gpt2)


def labelled_text(tokenizer: Any, feature: dict[str, list[int]]) -> str:
    ids = [i for i, label in zip(feature["input_ids"], feature["labels"], strict=True) if label != IGNORE_INDEX]
    assert ids == [label for label in feature["labels"] if label != IGNORE_INDEX]
    text: str = tokenizer.decode(ids)
    return text


def test_prompt_tokens_are_masked_in_collated_batches(tokenizer: Any) -> None:
    rows = [
        {"prompt": "what color is the sky ?", "completion": " blue"},
        {"prompt": "say something long and unusual here", "completion": " ok then"},
    ]
    features, dropped = encode_generation(tokenizer, rows, max_length=64)
    assert dropped == 0
    batch = CausalLMCollator(tokenizer.pad_token_id)(features)
    eos = tokenizer.eos_token_id
    for row, ids, labels, mask in zip(rows, batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        n_prompt = len(tokenizer(row["prompt"])["input_ids"])
        n_completion = len(tokenizer(row["completion"])["input_ids"]) + 1
        n = n_prompt + n_completion
        assert labels[:n_prompt].tolist() == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:n].tolist() == ids[n_prompt:n].tolist()
        assert labels[n - 1].item() == ids[n - 1].item() == eos
        assert tokenizer.decode(ids[n_prompt : n - 1]) == row["completion"]
        # Right padding: masked, unlabelled, filled with the pad id.
        assert mask[:n].tolist() == [1] * n and mask[n:].tolist() == [0] * (len(mask) - n)
        assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == tokenizer.pad_token_id).all()
    assert CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(features)["input_ids"].shape[1] % 8 == 0


def test_chat_rows_train_only_assistant_turns(tokenizer: Any) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "see you"},
        ]
    }
    (feature,), _ = encode_generation(tokenizer, [row], max_length=128)
    assert tokenizer.decode(feature["input_ids"]) == tokenizer.apply_chat_template(row["messages"], tokenize=False)
    # The template closes each turn with <|endoftext|>\n: the model learns to end its turn.
    assert labelled_text(tokenizer, feature) == "hello there<|endoftext|>\nsee you<|endoftext|>\n"


def test_chat_without_a_template_uses_the_fallback(tiny_gpt2: Path) -> None:
    plain = AutoTokenizer.from_pretrained(tiny_gpt2)
    plain.chat_template = None
    from training.generation import ensure_chat_template

    ensure_chat_template(plain)
    assert plain.chat_template == FALLBACK_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (feature,), _ = encode_generation(plain, [{"messages": messages}], max_length=64)
    assert plain.decode(feature["input_ids"]) == "<|user|>\nhi<|endoftext|>\n<|assistant|>\nyo<|endoftext|>\n"
    assert labelled_text(plain, feature) == "yo<|endoftext|>\n"


def test_text_rows_train_every_token_and_truncation(tokenizer: Any) -> None:
    (text,), _ = encode_generation(tokenizer, [{"text": "the food was good"}], max_length=64)
    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == tokenizer.eos_token_id
    long_prompt = {"prompt": "word " * 100, "completion": " the end"}
    (cut,), _ = encode_generation(tokenizer, [long_prompt], max_length=32)
    # The prompt loses its start; the completion and its EOS stay whole.
    assert len(cut["input_ids"]) == 32
    assert labelled_text(tokenizer, cut) == " the end<|endoftext|>"
    long_completion = {"prompt": "word " * 100, "completion": " more" * 100}
    (both,), _ = encode_generation(tokenizer, [long_completion], max_length=32)
    assert sum(label != IGNORE_INDEX for label in both["labels"]) == 16
    # An assistant turn beyond max_length leaves nothing to learn: the row is skipped.
    chat = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "x"}]}
    assert encode_generation(tokenizer, [chat], max_length=16) == ([], 1)


def test_length_groups_are_fixed_and_sorted() -> None:
    features = [{"input_ids": [0] * n, "labels": [0] * n} for n in [5, 1, 9, 3, 3, 7, 2, 8, 3]]
    groups = length_groups(features, 4, seed=0)
    assert groups == length_groups(features, 4, seed=0)
    assert [len(g) for g in groups] == [4, 4, 1]
    lengths = [[len(features[i]["input_ids"]) for i in g] for g in groups]
    assert lengths == [[1, 2, 3, 3], [3, 5, 7, 8], [9]]
    assert sorted(i for g in groups for i in g) == list(range(9))
    dataset = GroupedBatches(features, groups)
    assert len(dataset) == 3 and dataset[2] == [features[2]]


def test_resolve_hyperparameters_for_generation() -> None:
    resolved = resolve_hyperparameters({}, 100)
    assert resolved["max_seq_length"] == 512 and "lora" not in resolved
    assert resolve_hyperparameters({"max_seq_length": 64}, 100)["max_seq_length"] == 64
    assert resolve_hyperparameters(resolved, 100) == resolved


def make_spec(tiny_gpt2: Path, work: Path, n_epochs: int = 30) -> GenerationSpec:
    rows = color_rows(6)
    return GenerationSpec(
        base_model_dir=tiny_gpt2,
        output_dir=work / "model",
        checkpoint_dir=work / "checkpoints",
        train_rows=rows,
        eval_rows=color_rows(1),
        hyperparameters=resolve_hyperparameters({**FAST_HP, "n_epochs": n_epochs}, len(rows)),
        seed=0,
    )


@pytest.fixture(scope="module")
def trained(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[GenerationResult, Recorder]:
    recorder = Recorder()
    return train_generation(make_spec(tiny_gpt2, tmp_path_factory.mktemp("generation")), recorder), recorder


def test_generation_eval_loss_falls(trained: tuple[GenerationResult, Recorder]) -> None:
    result, recorder = trained
    assert result.outcome.completed and result.model_dir is not None
    metrics = result.metrics
    assert metrics["eval_loss"] < 0.2 < 5.0 < metrics["eval_loss_before"]
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["perplexity_before"] == pytest.approx(math.exp(metrics["eval_loss_before"]))
    # 48 rows in length-grouped batches of 8: 6 steps per epoch.
    assert result.outcome.global_step == result.outcome.total_steps == 180
    evaluations = [m for _, _, m in recorder.evaluations]
    assert len(evaluations) == 30
    assert all({"eval_loss", "eval_perplexity", "train_loss"} <= set(m) for m in evaluations)
    assert evaluations[-1]["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert result.outcome.trained_tokens > 48 * 30 * 10
    report = json.loads((result.model_dir / "eval_report.json").read_text())
    assert report["metrics"] == pytest.approx(metrics) and report["n_train"] == 48


def test_predictor_completes_learned_prompts(trained: tuple[GenerationResult, Recorder]) -> None:
    result, _ = trained
    assert result.model_dir is not None
    predictor = GenerationPredictor(result.model_dir, device=torch.device("cpu"))
    prompts = [f"what color is the {k} ?" for k in COLORS]
    outputs = predictor.generate(prompts, max_tokens=12, temperature=0, batch_size=3)
    for (k, v), (choice,) in zip(COLORS.items(), outputs, strict=True):
        assert choice["text"] == f" the {k} is {v} ."
        assert choice["finish_reason"] == "stop"
        assert choice["prompt_tokens"] == len(predictor.tokenizer(f"what color is the {k} ?")["input_ids"])
        # The completion's tokens plus the EOS that ended it.
        assert choice["completion_tokens"] == len(predictor.tokenizer(choice["text"])["input_ids"]) + 1
    # Left padding: a prompt gets the same greedy answer alone as in a batch of longer and shorter ones.
    alone = [predictor.generate([p], max_tokens=12, temperature=0)[0][0]["text"] for p in prompts[:3]]
    assert alone == [out[0]["text"] for out in outputs[:3]]


def test_generation_stops_at_its_time_limit(trained: tuple[GenerationResult, Recorder]) -> None:
    result, _ = trained
    assert result.model_dir is not None
    prompt = ["what color is the sky ?"]
    (free,) = GenerationPredictor(result.model_dir, device=torch.device("cpu")).generate(prompt, max_tokens=12,
                                                                                         temperature=0)[0:1]
    assert free[0]["finish_reason"] == "stop" and free[0]["completion_tokens"] > 2
    limited = GenerationPredictor(result.model_dir, device=torch.device("cpu"), max_seconds=1e-6)
    ((cut,),) = limited.generate(prompt, max_tokens=12, temperature=0)
    # The limit is checked after each step: one token, then the answer ends as at max_tokens.
    assert cut["finish_reason"] == "length" and cut["completion_tokens"] == 1


def test_predictor_stop_length_sampling_and_limits(trained: tuple[GenerationResult, Recorder]) -> None:
    result, _ = trained
    assert result.model_dir is not None
    predictor = GenerationPredictor(result.model_dir, device=torch.device("cpu"))
    (stopped,), (short,) = predictor.generate(
        ["what color is the sky ?", "what color is the snow ?"], max_tokens=12, temperature=0, stop=[" is"]
    )
    n_prompt = len(predictor.tokenizer("what color is the sky ?")["input_ids"])
    # The stop string is cut from the text; the tokens generated up to it count.
    assert stopped == {"text": " the sky", "finish_reason": "stop", "prompt_tokens": n_prompt, "completion_tokens": 3}
    assert short["text"] == " the snow" and short["finish_reason"] == "stop"
    (cut,) = predictor.generate(["what color is the grass ?"], max_tokens=2, temperature=0)[0]
    assert cut["finish_reason"] == "length" and cut["completion_tokens"] == 2
    assert " the grass is green .".startswith(cut["text"]) and len(cut["text"]) > 4
    sampled = predictor.generate(["the"], max_tokens=8, temperature=1.5, top_p=0.9, seed=7, n=3)
    assert len(sampled[0]) == 3
    assert sampled == predictor.generate(["the"], max_tokens=8, temperature=1.5, top_p=0.9, seed=7, n=3)
    assert all(c["completion_tokens"] <= 8 for c in sampled[0])
    with pytest.raises(ValueError, match="exceed the model's context of 256 tokens"):
        predictor.generate(["word " * 250], max_tokens=20)
    with pytest.raises(ValueError, match="temperature"):
        predictor.generate(["x"], temperature=3)
    assert predictor.generate([]) == []
    # An empty prompt starts from the BOS token.
    assert predictor.generate([""], max_tokens=3, temperature=0)[0][0]["prompt_tokens"] == 1


def test_chat_rows_train_and_the_predictor_chats(tiny_gpt2: Path, tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": f"color of {k} ?"}, {"role": "assistant", "content": v}]}
        for k, v in COLORS.items()
    ] * 4 + [{"text": "the sky is blue and the grass is green ."}, {"prompt": "2 + 2 =", "completion": " 4"}]
    spec = GenerationSpec(
        base_model_dir=tiny_gpt2,
        output_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "checkpoints",
        train_rows=rows,
        eval_rows=None,
        hyperparameters=resolve_hyperparameters({**FAST_HP, "n_epochs": 25}, len(rows)),
        seed=1,
        eval_fraction=0.1,
    )
    result = train_generation(spec, Recorder())
    assert result.outcome.completed and result.model_dir is not None
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    predictor = GenerationPredictor(result.model_dir, device=torch.device("cpu"))
    answers = predictor.chat(
        [[{"role": "user", "content": "color of sky ?"}], [{"role": "user", "content": "color of coal ?"}]],
        max_tokens=6,
        temperature=0,
    )
    assert [a[0]["text"] for a in answers] == ["blue", "black"]
    assert all(a[0]["finish_reason"] == "stop" for a in answers)
    with pytest.raises(ValueError, match="role, content"):
        predictor.chat([[{"role": "user"}]])


def test_stop_and_resume_matches_uninterrupted_run(tiny_gpt2: Path, tmp_path: Path) -> None:
    reference = train_generation(make_spec(tiny_gpt2, tmp_path / "reference", n_epochs=3), Recorder())
    spec = make_spec(tiny_gpt2, tmp_path / "paused", n_epochs=3)
    stopped = train_generation(spec, Recorder(stop_at=8, reason="pause"))
    assert not stopped.outcome.completed and stopped.model_dir is None and stopped.metrics == {}
    checkpoint = latest_checkpoint(spec.checkpoint_dir)
    assert checkpoint is not None and checkpoint.name == "checkpoint-8"
    second = Recorder()
    resumed = train_generation(spec, second, resume_from=checkpoint)
    assert second.steps[0].step == 9 and resumed.outcome.global_step == 18
    assert resumed.model_dir is not None and reference.model_dir is not None
    assert_same_weights(resumed.model_dir, reference.model_dir)
    assert resumed.metrics == pytest.approx(reference.metrics, abs=1e-5)
    assert resumed.outcome.trained_tokens == reference.outcome.trained_tokens


def test_generation_refuses_bad_rows(tiny_gpt2: Path, tmp_path: Path) -> None:
    spec = make_spec(tiny_gpt2, tmp_path)
    spec.train_rows = [{"prompt": "x", "completion": ""}, {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DataError) as caught:
        train_generation(spec, Recorder())
    assert caught.value.problems == [
        'line 1: "completion" is empty',
        'line 2: "messages" has no assistant message to learn from',
    ]
