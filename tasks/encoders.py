"""Sentence embeddings from an encoder, and zero-shot labels scored with them (the `embeddings` predictor).

Pooling is the model's authors' own where they wrote it down: a sentence-transformers directory
(`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`, as `all-MiniLM-L6-v2` ships) says
mean or CLS pooling, whether vectors are L2-normalised, and the longest input it reads. Without one (the tiny
models, fine-tuned classifiers and taggers) it is mean pooling over the attention mask, then L2
normalisation: sentence-transformers' default, and what OpenAI's unit-length embeddings lead clients to expect.

Loaded in the model process like `training.predict`'s predictors (same thread-safety: one lock around each
call), and imported only there, so torch stays out of the worker's own process.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from training.devices import pick_device
from training.lora import load_pretrained
from training.predict import labelled

log = logging.getLogger(__name__)

# The label prompt of zero-shot classification: the text's embedding is compared with this sentence's.
ZERO_SHOT_TEMPLATE = "This text is {label}."
# Cosine similarities of one text to different label prompts differ by a few hundredths with MiniLM (0.03 on
# average between "positive" and "negative" on SST-2 dev), so they are scaled before the softmax: at 0.05 a
# typical margin becomes p ≈ 0.65, about as sure as MiniLM's 0.69 zero-shot accuracy there warrants.
ZERO_SHOT_TEMPERATURE = 0.05
# Label prompts recur (a client sends the same labels with every request): their vectors are kept, this many.
LABEL_CACHE_SIZE = 4096
# Tokenizers without a real limit report a huge sentinel as model_max_length.
_NO_LIMIT = 1_000_000


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class Pooling:
    """How token states become one vector: mean or CLS, L2-normalised or not, and the input length read."""

    def __init__(self, mode: str = "mean", normalize: bool = True, max_length: int | None = None) -> None:
        self.mode = mode
        self.normalize = normalize
        self.max_length = max_length

    @classmethod
    def of(cls, model_dir: Path) -> Pooling:
        """The pooling a sentence-transformers directory declares, else mean pooling, normalised."""
        modules = _read_json(model_dir / "modules.json")
        if not isinstance(modules, list):
            return cls()
        types = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
        mode = "mean"
        if "Pooling" in types:
            config = _read_json(model_dir / str(types["Pooling"].get("path", "")) / "config.json") or {}
            if config.get("pooling_mode_cls_token"):
                mode = "cls"
            elif not config.get("pooling_mode_mean_tokens", True):
                raise ValueError(f"{model_dir.name}: only mean or CLS pooling is supported, not {config}")
        st_config = _read_json(model_dir / "sentence_bert_config.json") or {}
        max_length = st_config.get("max_seq_length")
        return cls(mode, "Normalize" in types, int(max_length) if isinstance(max_length, int) else None)


def _encoder(model_dir: Path) -> Any:
    """The bare encoder of `model_dir`: the model itself, or the body under a fine-tuned head."""
    architectures = AutoConfig.from_pretrained(model_dir).architectures or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        head: Any = AutoModelForSequenceClassification
    elif any(a.endswith("ForTokenClassification") for a in architectures):
        head = AutoModelForTokenClassification
    else:
        return load_pretrained(AutoModel, model_dir)
    # Through the head's own class, so a LoRA fine-tune's adapter is merged exactly as for its predictions.
    return load_pretrained(head, model_dir).base_model


class EmbeddingPredictor:
    """Loads an encoder once; `embed` turns texts into vectors and `zero_shot` scores texts against labels."""

    def __init__(self, model_dir: Path, device: torch.device | None = None) -> None:
        self.device = device or pick_device()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.model: Any = _encoder(model_dir)
        self.model.to(self.device)
        self.model.eval()
        self.pooling = Pooling.of(model_dir)
        limits = [self.pooling.max_length] if self.pooling.max_length else []
        if 0 < int(self.tokenizer.model_max_length) < _NO_LIMIT:
            limits.append(int(self.tokenizer.model_max_length))
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            limits.append(positions)
        self.max_length: int | None = min(limits) if limits else None
        self.dimensions = int(self.model.config.hidden_size)
        self._labels: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.lock = threading.RLock()

    def embed(self, texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        """One {"embedding": [float], "tokens": int} per text, in input order (tokens: those the model read)."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        with self.lock:
            vectors, tokens = self._vectors(texts, batch_size)
        return [{"embedding": v, "tokens": n} for v, n in zip(vectors.tolist(), tokens, strict=True)]

    def zero_shot(self, items: list[tuple[str, tuple[str, ...]]], batch_size: int = 32) -> list[dict[str, Any]]:
        """Label each (text, labels): {"label", "score", "scores"} by cosine similarity to the label prompts."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        with self.lock:
            texts = torch.nn.functional.normalize(self._vectors([text for text, _ in items], batch_size)[0], dim=-1)
            labels = self._label_vectors(sorted({label for _, item_labels in items for label in item_labels}),
                                         batch_size)
        results = []
        for vector, (_, item_labels) in zip(texts, items, strict=True):
            prompts = torch.stack([labels[label] for label in item_labels])
            # Both sides unit length (even where the model's own pooling is not normalised): cosine similarity.
            results.append(labelled(item_labels, (prompts @ vector / ZERO_SHOT_TEMPERATURE).softmax(dim=-1).tolist()))
        return results

    def _label_vectors(self, labels: list[str], batch_size: int) -> dict[str, torch.Tensor]:
        missing = [label for label in labels if label not in self._labels]
        if missing:
            vectors, _ = self._vectors([ZERO_SHOT_TEMPLATE.format(label=label) for label in missing], batch_size)
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
            for label, vector in zip(missing, vectors, strict=True):
                self._labels[label] = vector
        found = {}
        for label in labels:
            self._labels.move_to_end(label)
            found[label] = self._labels[label]
        while len(self._labels) > LABEL_CACHE_SIZE:
            self._labels.popitem(last=False)
        return found

    def _vectors(self, texts: list[str], batch_size: int) -> tuple[torch.Tensor, list[int]]:
        """Pooled vectors (rows, on the CPU, float32) and the tokens read of each text, in input order."""
        # Batching texts of similar length wastes less compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors = torch.empty(len(texts), self.dimensions)
        tokens = [0] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                encoded = self.tokenizer(
                    [texts[i] for i in chunk],
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                # float32 throughout, no autocast: vectors must agree with the reference to 1e-4 cosine.
                states = self.model(**encoded).last_hidden_state.float()
                mask = encoded["attention_mask"].unsqueeze(-1).to(states.dtype)
                if self.pooling.mode == "cls":
                    pooled = states[:, 0]
                else:
                    pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                if self.pooling.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
                vectors[chunk] = pooled.cpu()
                for i, count in zip(chunk, encoded["attention_mask"].sum(dim=1).tolist(), strict=True):
                    tokens[i] = int(count)
        return vectors, tokens
