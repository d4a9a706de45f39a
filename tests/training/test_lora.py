"""LoRA for all three tasks: settings, what trains, what is saved, loading base plus adapter, exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForTokenClassification, AutoTokenizer

from tests.training.conftest import Recorder, sentiment_rows
from tests.training.test_generation import color_rows
from tests.training.test_ner import ner_rows
from training import generation, ner
from training.base_models import BaseModelInfo
from training.classification import ClassificationSpec, train_classification
from training.classification import resolve_hyperparameters as classification_hyperparameters
from training.lora import (
    ADAPTER_MANIFEST,
    LoraModule,
    add_lora_hyperparameters,
    apply_lora,
    default_target_modules,
    is_adapter_dir,
    load_pretrained,
    resolve_lora,
)
from training.predict import ClassificationPredictor, GenerationPredictor, NerPredictor
from training.trainer import latest_checkpoint

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "config.json", ADAPTER_MANIFEST}


@pytest.fixture(scope="module")
def tiny_gpt2(base_models: dict[str, BaseModelInfo]) -> Path:
    return base_models["tiny-gpt2"].path


def test_resolve_lora() -> None:
    assert resolve_lora(None) is None and resolve_lora(False) is None
    assert resolve_lora(True) == {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "auto"}
    assert resolve_lora(True, "bert")["target_modules"] == ["query", "value"]  # type: ignore[index]
    given = {"r": 4.0, "alpha": 8, "dropout": 0, "target_modules": ["c_attn"]}
    assert resolve_lora(given) == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]}
    resolved = resolve_lora({"r": "auto", "alpha": 2.5, "target_modules": "all-linear"})
    assert resolved == {"r": 8, "alpha": 2.5, "dropout": 0.05, "target_modules": "all-linear"}
    assert resolve_lora(resolved) == resolved


@pytest.mark.parametrize(
    "value",
    [
        "yes",
        1,
        {"rank": 8},
        {"r": 0},
        {"r": 2.5},
        {"r": True},
        {"alpha": 0},
        {"alpha": float("inf")},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"target_modules": []},
        {"target_modules": "query"},
        {"target_modules": ["query", ""]},
    ],
)
def test_resolve_lora_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match=r"^lora"):
        resolve_lora(value)


def test_lora_hyperparameters() -> None:
    base = classification_hyperparameters({}, 100)
    assert add_lora_hyperparameters(base, {}) == base
    with_lora = add_lora_hyperparameters(base, {"lora": True})
    assert with_lora["lora"]["r"] == 8 and with_lora["learning_rate"] == pytest.approx(2e-4)
    doubled = add_lora_hyperparameters(base, {"lora": True, "learning_rate_multiplier": 2})
    assert doubled["learning_rate"] == pytest.approx(4e-4)
    explicit = add_lora_hyperparameters({**base, "learning_rate": 1e-3}, {"lora": True, "learning_rate": 1e-3})
    assert explicit["learning_rate"] == 1e-3
    resolved = ner.resolve_hyperparameters({"lora": {"r": 4}}, 100)
    assert resolved["lora"]["r"] == 4 and ner.resolve_hyperparameters(resolved, 100) == resolved
    assert "lora" in generation.resolve_hyperparameters({"lora": True}, 100)
    with pytest.raises(ValueError, match=r"^lora\.r "):
        ner.resolve_hyperparameters({"lora": {"r": -1}}, 100)


def test_default_target_modules() -> None:
    assert default_target_modules("bert") == ["query", "value"]
    assert default_target_modules("gpt2") == ["c_attn"]
    assert default_target_modules("llama") == ["q_proj", "v_proj"]
    assert default_target_modules("roberta") == ["query", "value"]
    with pytest.raises(ValueError, match=r"set lora\.target_modules"):
        default_target_modules("no-such-architecture")


def test_only_adapters_and_new_modules_train(tiny_bert: Path) -> None:
    model = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=5).eval()
    inputs = AutoTokenizer.from_pretrained(tiny_bert)(["Mary lives in Paris"], return_tensors="pt")
    with torch.inference_mode():
        base_logits = model(**inputs).logits
    wrapped = apply_lora(model, {}, "ner", tiny_bert)
    assert wrapped.lora["target_modules"] == ["query", "value"]
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name or ".modules_to_save." in name for name in trainable)
    # The new head trains; the encoder's own weights are frozen.
    assert any("classifier.modules_to_save" in name for name in trainable)
    n_trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert n_trainable < 0.05 * sum(p.numel() for p in wrapped.parameters())
    # LoRA starts as a no-op (B is zero), so the adapted model computes what the base did.
    wrapped.eval()
    with torch.inference_mode():
        assert torch.equal(wrapped(**inputs).logits, base_logits)


@pytest.fixture(scope="module")
def ner_lora(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> ner.NerResult:
    work = tmp_path_factory.mktemp("ner-lora")
    rows = ner_rows(120, seed=1)
    # Frozen random weights leave the adapter little to work with; a large step makes up for it.
    hp = ner.resolve_hyperparameters({"lora": True, "learning_rate": 2e-2, "n_epochs": 15, "batch_size": 8}, 120)
    spec = ner.NerSpec(tiny_bert, work / "model", work / "checkpoints", rows, None, hp, seed=0, eval_fraction=0.25)
    return ner.train_ner(spec, Recorder())


def test_ner_with_lora_learns_and_saves_an_adapter(ner_lora: ner.NerResult, tiny_bert: Path) -> None:
    assert ner_lora.outcome.completed and ner_lora.model_dir is not None
    assert ner_lora.metrics["f1"] >= 0.8
    files = {p.name for p in ner_lora.model_dir.iterdir()}
    assert ADAPTER_FILES | {"tokenizer.json", "eval_report.json"} <= files
    assert "model.safetensors" not in files and "model.safetensors.index.json" not in files
    manifest = json.loads((ner_lora.model_dir / ADAPTER_MANIFEST).read_text())
    assert manifest["base_model_dir"] == str(tiny_bert.resolve()) and manifest["task"] == "ner"
    assert manifest["lora"]["target_modules"] == ["query", "value"]
    report = json.loads((ner_lora.model_dir / "eval_report.json").read_text())
    assert report["hyperparameters"]["lora"] == manifest["lora"]
    assert is_adapter_dir(ner_lora.model_dir) and not is_adapter_dir(tiny_bert)


def test_merged_adapter_computes_what_the_adapter_does(ner_lora: ner.NerResult, tiny_bert: Path) -> None:
    assert ner_lora.model_dir is not None
    inputs = AutoTokenizer.from_pretrained(ner_lora.model_dir)(["we met Mary Jones in Paris ."], return_tensors="pt")
    merged = load_pretrained(AutoModelForTokenClassification, ner_lora.model_dir).eval()
    base = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=len(ner_lora.labels))
    adapted = PeftModel.from_pretrained(base, str(ner_lora.model_dir)).eval()
    with torch.inference_mode():
        assert torch.allclose(merged(**inputs).logits, adapted(**inputs).logits, atol=1e-5)
    assert merged.config.id2label == dict(enumerate(ner_lora.labels))
    predictor = NerPredictor(ner_lora.model_dir, device=torch.device("cpu"))
    text = "Mary Jones lives in Berlin."
    (entities,) = predictor.predict([text])
    assert [(e["entity_group"], e["text"]) for e in entities] == [("PER", "Mary Jones"), ("LOC", "Berlin")]
    assert all(e["text"] == text[e["start"] : e["end"]] for e in entities)


def gen_spec(tiny_gpt2: Path, work: Path, base: Path | None = None, lora: Any = True) -> generation.GenerationSpec:
    rows = color_rows(4)
    hp = {"lora": lora, "learning_rate": 1e-2, "n_epochs": 3, "batch_size": 8}
    return generation.GenerationSpec(
        base_model_dir=base or tiny_gpt2,
        output_dir=work / "model",
        checkpoint_dir=work / "checkpoints",
        train_rows=rows,
        eval_rows=color_rows(1),
        hyperparameters=generation.resolve_hyperparameters(hp, len(rows)),
        seed=3,
    )


def test_generation_lora_resumes_exactly(tiny_gpt2: Path, tmp_path: Path) -> None:
    reference = generation.train_generation(gen_spec(tiny_gpt2, tmp_path / "reference"), Recorder())
    assert reference.outcome.completed and reference.model_dir is not None
    assert reference.metrics["eval_loss"] < reference.metrics["eval_loss_before"]
    spec = gen_spec(tiny_gpt2, tmp_path / "paused")
    stopped = generation.train_generation(spec, Recorder(stop_at=5, reason="shutdown"))
    checkpoint = latest_checkpoint(spec.checkpoint_dir)
    assert not stopped.outcome.completed and checkpoint is not None and checkpoint.name == "checkpoint-5"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "model.safetensors.index.json", "optimizer.pt", "rng.pt"} <= files
    assert "model.safetensors" not in files
    # The checkpoint holds the adapter, not the frozen model.
    adapter_bytes = (checkpoint / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes * 20 < (tiny_gpt2 / "model.safetensors").stat().st_size
    resumed = generation.train_generation(spec, Recorder(), resume_from=checkpoint)
    assert resumed.outcome.completed and resumed.model_dir is not None
    left = load_file(resumed.model_dir / "adapter_model.safetensors")
    right = load_file(reference.model_dir / "adapter_model.safetensors")
    assert left.keys() == right.keys() and left
    for name, tensor in left.items():
        assert torch.allclose(tensor, right[name], atol=1e-6, rtol=1e-5), name
    assert resumed.metrics == pytest.approx(reference.metrics, abs=1e-5)
    assert [row["step"] for row in resumed.outcome.history] == [row["step"] for row in reference.outcome.history]


def test_generation_predictor_and_further_training_on_an_adapter(tiny_gpt2: Path, tmp_path: Path) -> None:
    first = generation.train_generation(gen_spec(tiny_gpt2, tmp_path / "first"), Recorder())
    assert first.model_dir is not None and is_adapter_dir(first.model_dir)
    predictor = GenerationPredictor(first.model_dir, device=torch.device("cpu"))
    ((choice,),) = predictor.generate(["what color is the sky ?"], max_tokens=4, temperature=0)
    assert choice["prompt_tokens"] > 0 and 1 <= choice["completion_tokens"] <= 4
    # A fine-tuned adapter can be the base of a further run: base plus adapter are merged first.
    second = generation.train_generation(
        gen_spec(tiny_gpt2, tmp_path / "second", base=first.model_dir, lora=False), Recorder()
    )
    assert second.model_dir is not None and (second.model_dir / "model.safetensors").is_file()
    assert second.metrics["eval_loss_before"] == pytest.approx(first.metrics["eval_loss"], rel=1e-4)
    ((again,),) = GenerationPredictor(second.model_dir).generate(["what color"], max_tokens=2)
    assert again["completion_tokens"] >= 1


def test_classification_with_lora_saves_an_adapter_and_resumes(tiny_bert: Path, tmp_path: Path) -> None:
    def spec(work: Path) -> ClassificationSpec:
        raw = {"lora": {"r": 4}, "learning_rate": 1e-2, "n_epochs": 3, "batch_size": 8}
        return ClassificationSpec(
            base_model_dir=tiny_bert,
            output_dir=work / "model",
            checkpoint_dir=work / "checkpoints",
            train_rows=sentiment_rows(40, seed=2),
            eval_rows=None,
            hyperparameters=add_lora_hyperparameters(classification_hyperparameters(raw, 40), raw),
            seed=5,
            eval_fraction=0.25,
        )

    reference = train_classification(spec(tmp_path / "reference"), Recorder())
    assert reference.outcome.completed and reference.model_dir is not None
    assert {p.name for p in reference.model_dir.iterdir()} >= ADAPTER_FILES
    paused_spec = spec(tmp_path / "paused")
    train_classification(paused_spec, Recorder(stop_at=5))
    checkpoint = latest_checkpoint(paused_spec.checkpoint_dir)
    assert checkpoint is not None
    resumed = train_classification(paused_spec, Recorder(), resume_from=checkpoint)
    assert resumed.model_dir is not None
    left = load_file(resumed.model_dir / "adapter_model.safetensors")
    right = load_file(reference.model_dir / "adapter_model.safetensors")
    assert any("pooler" in name for name in left) and any("classifier" in name for name in left)
    assert all(torch.allclose(tensor, right[name], atol=1e-6, rtol=1e-5) for name, tensor in left.items())
    predictor = ClassificationPredictor(reference.model_dir, device=torch.device("cpu"))
    assert predictor.labels == ["negative", "positive"]
    (prediction,) = predictor.predict(["the soup was lovely"])
    assert prediction["label"] in predictor.labels
    assert sum(prediction["scores"].values()) == pytest.approx(1.0)


def test_lora_module_refuses_a_checkpoint_without_adapter_weights(tiny_gpt2: Path) -> None:
    from transformers import AutoModelForCausalLM

    wrapped = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_gpt2), {"r": 2}, "generation", tiny_gpt2)
    assert isinstance(wrapped, LoraModule) and wrapped.config.model_type == "gpt2"
    with pytest.raises(ValueError, match="lacks adapter weights"):
        wrapped.load_state_dict({})
