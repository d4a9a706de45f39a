"""Zero-shot classification on a generation model: each label's likelihood as the answer to a question."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.base_models import BaseModelInfo
from training.predict import CONTENT_FREE_TEXTS, ZERO_SHOT_QUESTION, GenerationPredictor, is_causal_lm


@pytest.fixture(scope="module")
def gpt2(base_models: dict[str, BaseModelInfo]) -> GenerationPredictor:
    return GenerationPredictor(base_models["tiny-gpt2"].path, device=torch.device("cpu"))


def _likelihood_alone(predictor: GenerationPredictor, text: str, labels: tuple[str, ...], label: str) -> float:
    """log p(label | question) from one unpadded forward pass over the whole sequence."""
    prompt = predictor.encode_chats([[{"role": "user", "content": ZERO_SHOT_QUESTION.format(
        labels=", ".join(labels), text=text)}]])[0]
    answer = predictor.tokenizer(label, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = predictor.model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    log_probs = logits.log_softmax(dim=-1)
    return sum(float(log_probs[len(prompt) - 1 + t, token]) for t, token in enumerate(answer))


def test_label_scores_are_calibrated_answer_likelihoods_normalised_over_the_labels(gpt2: GenerationPredictor) -> None:
    items = [("the film was a delight", ("positive", "negative")),
             ("a much longer review that goes on about the plot and the acting for a while", ("good", "bad", "so-so")),
             ("short", ("sports news", "cooking"))]
    # Batch size 2 splits one text's labels across passes and pads sequences of different lengths together.
    results = gpt2.zero_shot(items, batch_size=2)
    for (text, labels), result in zip(items, results, strict=True):
        assert list(result["scores"]) == list(labels)
        # Each label's log-likelihood less the model's lean towards it (its mean for content-free texts).
        lean = [sum(_likelihood_alone(gpt2, free, labels, label) for free in CONTENT_FREE_TEXTS)
                / len(CONTENT_FREE_TEXTS) for label in labels]
        expected = torch.tensor([_likelihood_alone(gpt2, text, labels, label) - b
                                 for label, b in zip(labels, lean, strict=True)]).softmax(-1)
        for label, p in zip(labels, expected.tolist(), strict=True):
            assert math.isclose(result["scores"][label], p, abs_tol=1e-4), (label, result["scores"], p)
        assert result["label"] == max(labels, key=lambda label: result["scores"][label])
        assert result["score"] == result["scores"][result["label"]]


def test_only_causal_lm_directories_score_labels_by_likelihood(base_models: dict[str, BaseModelInfo],
                                                              tmp_path: Path) -> None:
    assert is_causal_lm(base_models["tiny-gpt2"].path)
    assert not is_causal_lm(base_models["tiny-bert"].path)
    assert not is_causal_lm(tmp_path)  # no config.json at all


def test_a_text_too_long_for_the_context_is_refused_naming_it(gpt2: GenerationPredictor) -> None:
    with pytest.raises(ValueError, match=r"input 1: .*context of 256"):
        gpt2.zero_shot([("fine", ("a", "b")), ("word " * 300, ("a", "b"))])


def test_generated_text_never_carries_a_nul(gpt2: GenerationPredictor) -> None:
    # Byte-level BPE: this token is the byte 0. Postgres cannot store a NUL in an answer's JSON.
    nul = gpt2.tokenizer.convert_tokens_to_ids("Ā")
    assert gpt2.tokenizer.decode([nul]) == "\x00"
    prompt = gpt2.encode_prompts(["hello"])[0]
    assert gpt2.decode_continuation(prompt, [nul, nul]) == "\ufffd\ufffd"
