"""Batch prediction with a fine-tuned classification model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from training.devices import autocast_dtype, pick_device

# Tokenizers without a real limit report a huge sentinel as model_max_length.
_NO_LIMIT = 1_000_000


class ClassificationPredictor:
    """Loads a classification model and its tokenizer once; `predict` labels batches of texts."""

    def __init__(self, model_dir: Path, device: torch.device | None = None) -> None:
        self.device = device or pick_device()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.model: Any = AutoModelForSequenceClassification.from_pretrained(model_dir)
        self.model.to(self.device)
        self.model.eval()
        id2label = self.model.config.id2label
        self.labels: list[str] = [str(id2label[i]) for i in range(len(id2label))]
        limits = []
        if 0 < int(self.tokenizer.model_max_length) < _NO_LIMIT:
            limits.append(int(self.tokenizer.model_max_length))
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            limits.append(positions)
        self.max_length: int | None = min(limits) if limits else None
        self._amp_dtype = autocast_dtype(self.device)

    def predict(
        self, texts: list[str], batch_size: int = 32, text_pairs: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Return one {"label", "score", "scores"} per text, in input order."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError("text_pairs must have one entry per text")
        # Batching texts of similar length wastes less compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[dict[str, Any]] = [{} for _ in texts]
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                pairs = [text_pairs[i] for i in chunk] if text_pairs is not None else None
                encoded = self.tokenizer(
                    [texts[i] for i in chunk],
                    pairs,
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                with torch.autocast(
                    device_type=self.device.type, dtype=self._amp_dtype, enabled=self._amp_dtype is not None
                ):
                    logits = self.model(**encoded).logits
                probabilities = logits.float().softmax(dim=-1).cpu().tolist()
                for i, probs in zip(chunk, probabilities, strict=True):
                    best = max(range(len(probs)), key=probs.__getitem__)
                    results[i] = {
                        "label": self.labels[best],
                        "score": float(probs[best]),
                        "scores": {label: float(p) for label, p in zip(self.labels, probs, strict=True)},
                    }
        return results
