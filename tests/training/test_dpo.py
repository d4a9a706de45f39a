"""DPO on tiny-gpt2: the loss by hand, validation by line, the margin over the reference, and exact resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.data import preference_rows
from tests.training.conftest import Recorder, assert_same_weights
from training.base_models import BaseModelInfo
from training.data import validate_dpo
from training.dpo import PairCollator, dpo_loss, encode_pairs, sequence_logps, train_dpo
from training.generation import GenerationSpec, ensure_chat_template
from training.trainer import latest_checkpoint

# A randomly initialised tiny decoder needs a large step to move within a few epochs.
FAST_HP: dict[str, Any] = {"learning_rate": 1e-3, "n_epochs": 4, "batch_size": 4, "beta": 0.5}


@pytest.fixture(scope="module")
def tiny_gpt2(base_models: dict[str, BaseModelInfo]) -> Path:
    return base_models["tiny-gpt2"].path


def make_spec(base: Path, work: Path, **hp: Any) -> GenerationSpec:
    return GenerationSpec(base_model_dir=base, output_dir=work / "model", checkpoint_dir=work / "checkpoints",
                          train_rows=preference_rows(2), eval_rows=preference_rows(), hyperparameters={**FAST_HP, **hp},
                          seed=0)


def test_loss_matches_a_hand_computed_value() -> None:
    policy_chosen, policy_rejected = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    reference_chosen, reference_rejected = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5)
    # Pair 1: 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5; pair 2: 0.5 * ((-3 + 2) - (-1 + 2)) = -1.
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.0))) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.25, -0.5]) and rejected.tolist() == pytest.approx([-0.25, 0.5])


def test_sequence_logps_sum_completion_tokens_only() -> None:
    # Vocabulary of 2; position t predicts token t+1. Only tokens 2 and 3 are completion.
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1], [0.5, 0.5]]]))
    input_ids = torch.tensor([[0, 1, 1, 0]])
    mask = torch.tensor([[0, 0, 1, 1]])
    assert float(sequence_logps(logits, input_ids, mask)[0]) == pytest.approx(math.log(0.75) + math.log(0.9))


def test_lines_are_validated_by_number() -> None:
    good = preference_rows()[0]
    rows = [
        (1, good),
        (2, {**good, "preferred_output": {"role": "assistant", "content": "x"}}),
        (3, {**good, "non_preferred_output": [{"role": "user", "content": "x"}]}),
        (4, {"input": {"messages": []}, "preferred_output": good["preferred_output"]}),
        (5, {**good, "input": {"messages": [{"role": "robot", "content": "hi"}]}}),
        (6, {**good, "non_preferred_output": good["preferred_output"]}),
    ]
    assert validate_dpo(rows) == [
        'line 2: "preferred_output" must be a list with one assistant message',
        'line 3: "non_preferred_output" must be a list with one assistant message',
        'line 4: a DPO line needs "input", "preferred_output" and "non_preferred_output"; missing '
        "'non_preferred_output'",
        'line 5: input.messages[0].role must be "system", "user" or "assistant"',
        "line 6: the preferred and non-preferred outputs are the same text",
    ]


def test_pairs_mask_the_prompt_and_put_chosen_first(tiny_gpt2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    ensure_chat_template(tokenizer)
    features = encode_pairs(tokenizer, preference_rows()[:2], max_length=128)
    batch = PairCollator(int(tokenizer.eos_token_id))(features)
    assert batch["input_ids"].shape[0] == 4
    chosen = features[0]
    scored = [t for t, m in zip(chosen["chosen_ids"], chosen["chosen_mask"], strict=True) if m]
    text = str(tokenizer.decode(scored))
    assert text.strip().startswith(preference_rows()[0]["preferred_output"][0]["content"])
    assert "what color" not in text
    assert batch["completion_mask"][0].sum() == sum(chosen["chosen_mask"])
    assert batch["completion_mask"][2].sum() == sum(chosen["rejected_mask"])


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_raises_the_margin_over_the_reference(tiny_gpt2: Path, tmp_path: Path, lora: bool) -> None:
    recorder = Recorder()
    hp: dict[str, Any] = {"lora": {"r": 8, "alpha": 16, "target_modules": ["c_attn"]}, "learning_rate": 1e-2} \
        if lora else {}
    result = train_dpo(make_spec(tiny_gpt2, tmp_path, **hp), recorder)
    assert result.model_dir is not None
    # eval_rewards/margins = beta * ((policy chosen - rejected) - (reference chosen - rejected)).
    assert result.metrics["eval_rewards/margins"] > 0
    assert result.metrics["eval_rewards/accuracies"] > 0.5
    assert result.metrics["eval_win_rate"] >= result.metrics["eval_win_rate_before"]
    last = recorder.evaluations[-1][2]
    assert {"train_loss", "rewards/accuracies", "rewards/margins", "eval_rewards/accuracies"} <= set(last)
    # At the start policy and reference agree, so the loss is log 2; training brought it below.
    assert last["eval_loss"] < math.log(2)
    names = {p.name for p in result.model_dir.iterdir()}
    assert ("adapter_model.safetensors" in names) == lora
    if not lora:
        # The frozen reference is no part of what is saved: only the policy's weights, under their own names.
        saved = load_file(result.model_dir / "model.safetensors")
        assert not any(name.startswith(("policy.", "_reference")) for name in saved)


def test_pause_and_resume_match_an_uninterrupted_run(tiny_gpt2: Path, tmp_path: Path) -> None:
    reference = train_dpo(make_spec(tiny_gpt2, tmp_path / "reference"), Recorder())
    spec = make_spec(tiny_gpt2, tmp_path / "paused")
    stopped = train_dpo(spec, Recorder(stop_at=3, reason="pause"))
    assert not stopped.outcome.completed and stopped.model_dir is None
    checkpoint = latest_checkpoint(spec.checkpoint_dir)
    assert checkpoint is not None and checkpoint.name == "checkpoint-3"
    second = Recorder()
    resumed = train_dpo(spec, second, resume_from=checkpoint)
    assert second.steps[0].step == 4 and resumed.outcome.global_step == reference.outcome.global_step
    assert resumed.model_dir is not None and reference.model_dir is not None
    assert_same_weights(resumed.model_dir, reference.model_dir)
    assert resumed.metrics == pytest.approx(reference.metrics, abs=1e-5)
    # The reward metrics of the loss curve, averaged across the pause, too.
    assert len(resumed.outcome.history) == len(reference.outcome.history)
    for left_row, right_row in zip(resumed.outcome.history, reference.outcome.history, strict=True):
        assert left_row == pytest.approx(right_row, abs=1e-5)
