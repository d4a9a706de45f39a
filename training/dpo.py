"""Preference tuning (DPO) of a causal language model, full or LoRA, through our own training loop.

Each line pairs a prompt (``input.messages``) with a preferred and a non-preferred assistant reply
(OpenAI's DPO format). Both replies are rendered with the model's chat template after the prompt, as the
supervised chat path does; only the reply's tokens (and its end-of-turn marker) count. For each pair,
with policy log-probs ``pc``/``pr`` and reference log-probs ``rc``/``rr`` of the chosen/rejected reply
(summed over its tokens), the loss is ``-logsigmoid(beta * ((pc - rc) - (pr - rr)))`` (Rafailov et al.).

The reference is the job's base model: with LoRA, the same model with its adapter switched off; for a
full fine-tune, a frozen copy taken before training. ``DpoModule`` wraps policy and reference for
``run_training``: its forward returns the loss and the reward metrics, and its state dict is the
policy's alone, so checkpoints, exact resume, cancel and pause work as for supervised jobs.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.callbacks import TrainingCallbacks
from training.classification import EVAL_REPORT_FILE
from training.data import DataError, validate_dpo
from training.devices import autocast_dtype, pick_device
from training.generation import (
    GenerationResult,
    GenerationSpec,
    chat_segments,
    load_for_training,
    validated_split,
)
from training.generation import resolve_hyperparameters as resolve_generation
from training.hyperparameters import BETA_LIMIT
from training.lora import LoraModule, apply_lora, save_model_dir
from training.trainer import TrainArgs, run_training, tokenizer_writer

log = logging.getLogger(__name__)

DEFAULT_BETA = 0.1
# DPO pushes the two replies' log-ratios apart without bound; at supervised rates the policy leaves the
# reference (and fluent text) behind within an epoch, so "auto" takes a tenth of the supervised rate.
DPO_LEARNING_RATE_FACTOR = 0.1
_EVAL_BATCH_SIZE = 8

PairFeature = dict[str, list[int]]


def resolve_hyperparameters(hp: dict[str, Any], n_train_rows: int) -> dict[str, Any]:
    """Generation's resolution (LoRA included), a lower default learning rate, and `beta`."""
    rest = {k: v for k, v in hp.items() if k != "beta"}
    resolved = resolve_generation(rest, n_train_rows)
    if hp.get("learning_rate") in (None, "auto"):
        resolved["learning_rate"] = resolved["learning_rate"] * DPO_LEARNING_RATE_FACTOR
    beta = hp.get("beta")
    if beta in (None, "auto"):
        beta = DEFAULT_BETA
    if isinstance(beta, bool) or not isinstance(beta, int | float):
        raise ValueError(f"beta must be a number or \"auto\", got {beta!r}")
    BETA_LIMIT.check("beta", beta)
    resolved["beta"] = float(beta)
    return resolved


# --- the loss ------------------------------------------------------------------------------------


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean DPO loss over pairs of summed log-probs, and each pair's chosen and rejected rewards."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Each row's log-probability of its completion tokens (summed), from next-token logits."""
    # Position t predicts token t+1; float32 so long sums of small log-probs keep their precision.
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logps = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * completion_mask[:, 1:].to(token_logps.dtype)).sum(-1)


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """OpenAI's (and TRL's) names: the share of pairs ranked right, and the mean reward gap."""
    return {
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
    }


def _disable_dropout(model: torch.nn.Module) -> None:
    # With dropout the policy's log-probs are noisy against the reference's, and rewards start off zero
    # only by chance; TRL's DPO trainer turns it off for the same reason.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class DpoModule(torch.nn.Module):
    """The policy (trained) and its reference (frozen), with the DPO loss as forward's output.

    Batches hold the chosen replies in their first half and the rejected ones, in the same order, in
    the second. Only the policy is a registered submodule: parameters, state dict and checkpoints are its.
    """

    def __init__(self, policy: torch.nn.Module, beta: float, reference: torch.nn.Module | None = None) -> None:
        super().__init__()
        if reference is None and not isinstance(policy, LoraModule):
            raise ValueError("a full fine-tune needs a frozen reference model")
        self.policy = policy
        self.beta = beta
        # Kept out of the module tree, so it never reaches the optimizer or a checkpoint.
        self._reference = [reference] if reference is not None else []
        for frozen in self._reference:
            frozen.requires_grad_(False)
            frozen.eval()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DpoModule:
        # `.to(device)` must move the reference with the policy.
        super()._apply(fn, recurse)
        for frozen in self._reference:
            frozen._apply(fn, recurse)
        return self

    def _logps(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               completion_mask: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return sequence_logps(logits, input_ids, completion_mask)

    def policy_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     completion_mask: torch.Tensor) -> torch.Tensor:
        return self._logps(self.policy, input_ids, attention_mask, completion_mask)

    def reference_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor) -> torch.Tensor:
        """The base model's log-probs: the frozen copy, or the policy with its LoRA adapter switched off."""
        with torch.no_grad():
            if self._reference:
                return self._logps(self._reference[0], input_ids, attention_mask, completion_mask)
            assert isinstance(self.policy, LoraModule)
            with self.policy.peft_model.disable_adapter():
                return self._logps(self.policy, input_ids, attention_mask, completion_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                completion_mask: torch.Tensor) -> dict[str, Any]:
        """The DPO loss of a batch of pairs, with its reward metrics."""
        policy = self.policy_logps(input_ids, attention_mask, completion_mask)
        reference = self.reference_logps(input_ids, attention_mask, completion_mask)
        half = input_ids.shape[0] // 2
        loss, chosen, rejected = dpo_loss(policy[:half], policy[half:], reference[:half], reference[half:],
                                          self.beta)
        return {"loss": loss, "metrics": reward_metrics(chosen, rejected)}

    # Checkpoints hold the policy alone, under its own names, as a supervised run's do.
    def save_pretrained(self, directory: Path) -> None:
        self.policy.save_pretrained(directory)  # type: ignore[operator]

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.policy.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.policy.load_state_dict(state_dict, strict=strict, assign=assign)


# --- encoding ------------------------------------------------------------------------------------


def _encode_reply(tokenizer: Any, messages: list[dict[str, Any]], reply: str,
                  max_length: int) -> tuple[list[int], list[int]]:
    """The prompt plus one reply as the chat template renders it; the mask marks the reply's tokens."""
    eos = int(tokenizer.eos_token_id)
    conversation = [*messages, {"role": "assistant", "content": reply}]
    # The conversation ends with the reply, so its segment is the last one; earlier assistant turns in
    # the prompt are context here.
    segments = chat_segments(tokenizer, conversation)
    last = len(segments) - 1
    if not segments[last][1]:
        raise ValueError("the chat template adds text after the reply; its tokens cannot be told apart")
    prompt: list[int] = []
    for text, _ in segments[:last]:
        prompt.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    completion = list(tokenizer(segments[last][0], add_special_tokens=False)["input_ids"])
    if eos not in completion:
        # As in supervised chat: the template closes turns without EOS, and stopping is part of the reply.
        completion.append(eos)
    if len(prompt) + len(completion) > max_length:
        # Keep as much reply as fits beside at least half a window of the prompt's end.
        kept = min(len(completion), max_length - min(len(prompt), max_length // 2))
        completion = completion[:kept]
        prompt = prompt[len(prompt) - (max_length - kept):] if max_length > kept else []
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def encode_pairs(tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> list[PairFeature]:
    """Chosen and rejected ids with their completion masks, one feature per preference line."""
    features: list[PairFeature] = []
    problems: list[str] = []
    for line, row in enumerate(rows, start=1):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["input"]["messages"]]
        try:
            chosen, chosen_mask = _encode_reply(tokenizer, messages, row["preferred_output"][0]["content"],
                                                max_length)
            rejected, rejected_mask = _encode_reply(tokenizer, messages, row["non_preferred_output"][0]["content"],
                                                    max_length)
        except ValueError as exc:
            problems.append(f"line {line}: {exc}")
            continue
        features.append({"chosen_ids": chosen, "chosen_mask": chosen_mask,
                         "rejected_ids": rejected, "rejected_mask": rejected_mask})
    if problems:
        raise DataError(problems)
    return features


class PairCollator:
    """Pad pairs on the right into one batch: chosen replies first, then the rejected ones in order."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, pairs: list[PairFeature]) -> dict[str, torch.Tensor]:
        sequences = [(p["chosen_ids"], p["chosen_mask"]) for p in pairs]
        sequences += [(p["rejected_ids"], p["rejected_mask"]) for p in pairs]
        width = max(len(ids) for ids, _ in sequences)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (ids, mask) in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            completion_mask[row, : len(ids)] = torch.tensor(mask, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def pair_length(feature: PairFeature) -> int:
    return max(len(feature["chosen_ids"]), len(feature["rejected_ids"]))


# --- evaluation and training ---------------------------------------------------------------------


def evaluate_pairs(model: DpoModule, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean DPO loss and reward metrics over pre-collated batches, weighted by pairs; win rates (the share
    of pairs whose preferred reply is the likelier one) of the policy and of the reference."""
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(device)
    was_training = model.training
    model.eval()
    chosen: list[torch.Tensor] = []
    rejected: list[torch.Tensor] = []
    # Which reply each model finds likelier: the policy's choices now, the reference's before training.
    policy_wins: list[torch.Tensor] = []
    reference_wins: list[torch.Tensor] = []
    with torch.inference_mode():
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                policy = model.policy_logps(**inputs)
                reference = model.reference_logps(**inputs)
            half = policy.shape[0] // 2
            chosen.append(model.beta * (policy[:half] - reference[:half]))
            rejected.append(model.beta * (policy[half:] - reference[half:]))
            policy_wins.append(policy[:half] > policy[half:])
            reference_wins.append(reference[:half] > reference[half:])
    model.train(was_training)
    chosen_rewards, rejected_rewards = torch.cat(chosen), torch.cat(rejected)
    loss = float(-F.logsigmoid(chosen_rewards - rejected_rewards).mean())
    return {"eval_loss": loss, **{f"eval_{k}": v for k, v in reward_metrics(chosen_rewards, rejected_rewards).items()},
            "eval_win_rate": float(torch.cat(policy_wins).float().mean()),
            "eval_win_rate_before": float(torch.cat(reference_wins).float().mean())}


def train_dpo(
    spec: GenerationSpec,
    callbacks: TrainingCallbacks,
    resume_from: Path | None = None,
    device: torch.device | None = None,
) -> GenerationResult:
    """Preference-tune a causal LM on DPO pairs; save the model (or LoRA adapter) and tokenizer when done."""
    train_rows, eval_rows = validated_split(spec, validate_dpo)
    hp = resolve_hyperparameters(spec.hyperparameters, len(spec.train_rows))
    device = device or pick_device()

    tokenizer, base, max_length = load_for_training(spec, int(hp["max_seq_length"]))
    _disable_dropout(base)
    if "lora" in hp:
        policy: torch.nn.Module = apply_lora(base, hp["lora"], "generation", spec.base_model_dir)
        _disable_dropout(policy)
        hp["lora"] = policy.lora
        model = DpoModule(policy, float(hp["beta"]))
    else:
        model = DpoModule(base, float(hp["beta"]), reference=copy.deepcopy(base))

    train_features = encode_pairs(tokenizer, train_rows, max_length)
    eval_features = encode_pairs(tokenizer, eval_rows, max_length)
    collator = PairCollator(int(tokenizer.pad_token_id), pad_to_multiple_of=8 if device.type == "cuda" else None)
    eval_batches = [collator(eval_features[i: i + _EVAL_BATCH_SIZE])
                    for i in range(0, len(eval_features), _EVAL_BATCH_SIZE)]

    def evaluate(trained: torch.nn.Module) -> dict[str, float]:
        assert isinstance(trained, DpoModule)
        return evaluate_pairs(trained, eval_batches)

    args = TrainArgs.from_hyperparameters(hp, spec.checkpoint_dir, spec.seed)
    args.checkpoint_extras = tokenizer_writer(tokenizer)
    log.info("dpo: %d train pairs, %d eval pairs, max_length %d, %s", len(train_features), len(eval_features),
             max_length, hp)
    outcome = run_training(model, train_features, collator, args, callbacks,
                           evaluate=evaluate if eval_batches else None, resume_from=resume_from, device=device,
                           lengths=[pair_length(f) for f in train_features])
    if not outcome.completed:
        return GenerationResult(outcome=outcome, model_dir=None, metrics={})
    # The last epoch's evaluation saw these very weights: reuse it rather than score every pair twice more.
    last = outcome.history[-1] if outcome.history else {}
    metrics = {k: float(v) for k, v in last.items() if k.startswith("eval_")}
    if eval_batches and not metrics:
        metrics = evaluate_pairs(model, eval_batches)
    eval_report = {"metrics": metrics, "n_train": len(train_features), "n_eval": len(eval_features),
                   "hyperparameters": hp, "max_length": max_length, "method": "dpo"}
    save_model_dir(model.policy, tokenizer, spec.output_dir, {EVAL_REPORT_FILE: json.dumps(eval_report, indent=2)})
    return GenerationResult(outcome=outcome, model_dir=spec.output_dir, metrics=metrics)
