"""int8 on CPU (`LLMOS_CPU_INT8=1`): the model process serves quantised classifiers (and taggers and small
decoders) whose answers stay close to float, and leaves embeddings float32.

The stack's settings are fixed for the session, so this starts the inference worker's own model process
(`EngineProcess`, spawned as the worker spawns it) with the setting on, and compares its answers with the
same calls run in float in this process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.api.test_inference_serving import _train_classifier
from tests.conftest import Api
from tests.data import NEGATIVE, POSITIVE, SUBJECTS

TEXTS = [f"{SUBJECTS[i % len(SUBJECTS)]} was {(POSITIVE + NEGATIVE)[i % (len(POSITIVE) + len(NEGATIVE))]}"
         + " indeed" * (i % 3) for i in range(24)]


def _path(model_id: str) -> str:
    from db.models import Model
    from db.session import transaction

    with transaction() as session:
        row = session.get(Model, model_id)
        assert row is not None
        return row.path


def test_int8_model_process_answers_close_to_float(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings
    from tasks.serving import EngineProcess, LocalRunner, ModelCall

    classifier = _train_classifier(api)
    calls: dict[str, Callable[[list[str]], ModelCall]] = {
        "classification": lambda texts: ModelCall(classifier, _path(classifier), "classification", "predict", texts),
        "embeddings": lambda texts: ModelCall("minilm-l6", _path("minilm-l6"), "embeddings", "embed", texts),
        "zero-shot": lambda texts: ModelCall("minilm-l6", _path("minilm-l6"), "embeddings", "zero_shot",
                                             [(text, ("positive", "negative")) for text in texts]),
    }
    assert not get_settings().cpu_int8
    floats = LocalRunner(get_settings())
    expected = {name: floats.run(call(TEXTS)) for name, call in calls.items()}

    monkeypatch.setenv("LLMOS_CPU_INT8", "1")  # read by the child when it starts
    engine = EngineProcess()
    engine.start()
    try:
        got = {name: engine.run(call(TEXTS)) for name, call in calls.items()}
        greedy = engine.run(ModelCall("tiny-gpt2", _path("tiny-gpt2"), "generation", "generate", ["Once upon"],
                                      (("max_tokens", 4), ("temperature", 0.0))))
    finally:
        engine.stop()

    pairs = list(zip(got["classification"], expected["classification"], strict=True))
    assert [g["label"] for g, _ in pairs] == [e["label"] for _, e in pairs]
    moved = [abs(g["scores"][label] - e["scores"][label]) for g, e in pairs for label in e["scores"]]
    assert max(moved) < 0.05, f"a probability moved by {max(moved):.3f}"
    # Close, not equal: the answers did come from an int8 model.
    assert max(moved) > 0
    # Embeddings and zero-shot labels stay float32 (their contract is sentence-transformers' vectors to 1e-4).
    assert max(abs(x - y) for g, e in zip(got["embeddings"], expected["embeddings"], strict=True)
               for x, y in zip(g["embedding"], e["embedding"], strict=True)) < 1e-5
    assert [g["label"] for g in got["zero-shot"]] == [e["label"] for e in expected["zero-shot"]]
    assert max(abs(g["score"] - e["score"]) for g, e in zip(got["zero-shot"], expected["zero-shot"],
                                                            strict=True)) < 1e-4
    assert greedy[0][0]["completion_tokens"] >= 1


def test_int8_quantises_linear_layers_on_cpu_only(services: dict[str, str]) -> None:
    import torch

    from tasks.serving import load_predictor, model_bytes, quantize_int8

    tiny_bert = Path(services["home"]) / "models" / "tiny-bert"
    plain = load_predictor("classification", tiny_bert)
    int8 = load_predictor("classification", tiny_bert, int8=True)
    kinds = {type(m).__module__ for m in int8.model.modules()}
    assert "torch.ao.nn.quantized.dynamic.modules.linear" in kinds
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.model.modules())
    # Its packed int8 weights count towards the model cache's budget: about a quarter of the float Linear bytes.
    assert 0 < model_bytes(int8) < model_bytes(plain)
    assert model_bytes(int8) > model_bytes(plain) - sum(
        m.weight.numel() * 4 for m in plain.model.modules() if isinstance(m, torch.nn.Linear))

    class OnCuda:
        device = torch.device("cuda")
        model: Any = torch.nn.Sequential(torch.nn.Linear(4, 4))

    on_cuda = OnCuda()
    assert quantize_int8(on_cuda).model is OnCuda.model
