"""Batch prediction with fine-tuned models: classification, NER and text generation (plain or LoRA dirs).

Predictors are safe to call from several threads: each holds one lock around its public methods, since
HF fast tokenizers raise "Already borrowed" under concurrent use and one forward pass at a time uses the
CPU cores best anyway.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GenerationConfig,
)

from training.data import normalise_tags
from training.devices import autocast_dtype, pick_device
from training.generation import ensure_chat_template, prompt_ids
from training.lora import load_pretrained
from training.tagging import IOB2Decoder

log = logging.getLogger(__name__)

# Below this, sampling is greedy in all but name, and dividing logits by a temperature near zero (the API
# accepts any value in [0, 2]) overflows them to inf and the sampler fails.
GREEDY_BELOW_TEMPERATURE = 1e-4
# Tokenizers without a real limit report a huge sentinel as model_max_length.
_NO_LIMIT = 1_000_000


class ClassificationPredictor:
    """Loads a classification model and its tokenizer once; `predict` labels batches of texts."""

    def __init__(self, model_dir: Path, device: torch.device | None = None) -> None:
        self.device = device or pick_device()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.model: Any = load_pretrained(AutoModelForSequenceClassification, model_dir)
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
        self.lock = threading.RLock()

    def predict(
        self, texts: list[str], batch_size: int = 32, text_pairs: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Return one {"label", "score", "scores"} per text, in input order; safe from several threads."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError("text_pairs must have one entry per text")
        with self.lock:
            return self._predict(texts, batch_size, text_pairs)

    def _predict(self, texts: list[str], batch_size: int, text_pairs: list[str] | None) -> list[dict[str, Any]]:
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


def _position_limit(tokenizer: Any, config: Any) -> int | None:
    """The longest input the model takes: the tokenizer's limit or the position table, whichever is smaller."""
    limits = []
    if 0 < int(tokenizer.model_max_length) < _NO_LIMIT:
        limits.append(int(tokenizer.model_max_length))
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits) if limits else None


# --- NER -----------------------------------------------------------------------------------------


# Windows of long NER texts run through the model this many at a time.
WINDOWS_PER_PASS = 32


class NerPredictor:
    """Loads a token-classification model once; `predict` finds entities with exact character offsets.

    Words are those of the tokenizer's pre-tokenizer on the raw text (for BERT: whitespace and
    punctuation apart), each labelled by its first sub-token as in training. Texts longer than the
    model's limit are read in overlapping windows, so entities past the limit are found too.
    """

    def __init__(self, model_dir: Path, device: torch.device | None = None, constrained: bool = True) -> None:
        """``constrained``: tags are the best valid IOB2 sequence (`training.tagging`); False takes each word's
        most likely tag on its own (kept for comparison: `bench/quality.py` measures both)."""
        self.device = device or pick_device()
        self.constrained = constrained
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{model_dir}: NER needs a fast tokenizer (tokenizer.json) for character offsets")
        self.model: Any = load_pretrained(AutoModelForTokenClassification, model_dir)
        self.model.to(self.device)
        self.model.eval()
        id2label = self.model.config.id2label
        self.labels: list[str] = [str(id2label[i]) for i in range(len(id2label))]
        self._decoder = IOB2Decoder(self.labels)
        self.max_length = _position_limit(self.tokenizer, self.model.config)
        self._amp_dtype = autocast_dtype(self.device)
        self.lock = threading.RLock()

    def predict(self, texts: list[str], batch_size: int = 32) -> list[list[dict[str, Any]]]:
        """Return, per text, its entities: {"entity_group", "text", "start", "end", "score"}, in text order."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[list[dict[str, Any]]] = [[] for _ in texts]
        with self.lock:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                for i, words in zip(chunk, self._word_predictions([texts[i] for i in chunk]), strict=True):
                    results[i] = group_entities(texts[i], words)
        return results

    def _word_predictions(self, texts: list[str]) -> list[list[tuple[str, float, int, int]]]:
        """Return, per text, its words in order as (IOB2 tag, probability, start char, end char)."""
        windowed = self.max_length is not None
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=windowed,
            max_length=self.max_length,
            # Neighbouring windows overlap, so a word cut at a window's end is whole in the next one.
            stride=min(32, self.max_length // 4) if self.max_length is not None else 0,
            return_overflowing_tokens=windowed,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        offsets = encoded.pop("offset_mapping").tolist()
        if "overflow_to_sample_mapping" in encoded:
            sample_of = encoded.pop("overflow_to_sample_mapping").tolist()
        else:
            sample_of = list(range(len(texts)))
        # A long text becomes many windows: they go through the model at most WINDOWS_PER_PASS at a time, so
        # 32 texts of 100,000 characters cost a few thousand small passes, not one pass of thousands of rows.
        windows = len(sample_of)
        passes: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, windows, WINDOWS_PER_PASS):
                inputs = {k: v[start : start + WINDOWS_PER_PASS].to(self.device) for k, v in encoded.items()}
                with torch.autocast(
                    device_type=self.device.type, dtype=self._amp_dtype, enabled=self._amp_dtype is not None
                ):
                    logits = self.model(**inputs).logits
                passes.append(logits.float().log_softmax(dim=-1).cpu())
        log_probs = torch.cat(passes).numpy()
        # word index -> [its first sub-token's (window, position), start, end]; the first window that has a
        # word's start wins.
        words: list[dict[int, list[Any]]] = [{} for _ in texts]
        for window, sample in enumerate(sample_of):
            for position, word in enumerate(encoded.word_ids(window)):
                if word is None:
                    continue
                begin, end = offsets[window][position]
                seen = words[sample].get(word)
                if seen is None:
                    words[sample][word] = [(window, position), begin, end]
                else:
                    seen[1], seen[2] = min(seen[1], begin), max(seen[2], end)
        results = []
        for by_word in words:
            ordered = [w for _, w in sorted(by_word.items())]
            rows = np.stack([log_probs[w[0]] for w in ordered]) if ordered else np.zeros((0, len(self.labels)))
            chosen = self._decoder.decode(rows) if self.constrained else [int(i) for i in rows.argmax(axis=-1)]
            results.append([(self.labels[c], float(np.exp(rows[i, c])), w[1], w[2])
                            for i, (c, w) in enumerate(zip(chosen, ordered, strict=True))])
        return results


def group_entities(text: str, words: list[tuple[str, float, int, int]]) -> list[dict[str, Any]]:
    """Group IOB2-tagged words into entities; an I- that opens an entity counts as B-, as conlleval does."""
    tags = normalise_tags([tag for tag, _, _, _ in words], "IOB2")
    entities: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    scores: list[float] = []

    def close() -> None:
        nonlocal current
        if current is not None:
            current["score"] = sum(scores) / len(scores)
            current["text"] = text[current["start"] : current["end"]]
            entities.append(current)
        current = None

    for tag, (_, probability, begin, end) in zip(tags, words, strict=True):
        if tag == "O":
            close()
            continue
        if tag.startswith("B-") or current is None:
            close()
            current = {"entity_group": tag[2:], "text": "", "start": begin, "end": end, "score": 0.0}
            scores = []
        current["end"] = end
        scores.append(probability)
    close()
    return entities


# --- generation ----------------------------------------------------------------------------------

# The question a generation model answers for zero-shot classification; the label is scored as its answer.
ZERO_SHOT_QUESTION = "Classify the text as one of: {labels}. Answer with the label only.\n\nText: {text}"
# Content-free texts (contextual calibration, Zhao et al. 2021): a small model's answers lean towards some
# labels whatever the text (smollm2-135m-instruct said "positive" to 864 of SST-2 dev's 872 sentences,
# accuracy 0.52); each label's mean log-likelihood for these texts is that lean, and is subtracted.
CONTENT_FREE_TEXTS = ("N/A", "", "[MASK]")
# Label sets whose lean is kept (a client sends the same labels with every request).
LABEL_PRIOR_CACHE_SIZE = 256


def labelled(labels: Sequence[str], probabilities: Sequence[float]) -> dict[str, Any]:
    """A zero-shot answer in a classifier's shape: the likeliest label, its probability, every label's."""
    best = max(range(len(labels)), key=probabilities.__getitem__)
    return {"label": labels[best], "score": float(probabilities[best]),
            "scores": {label: float(p) for label, p in zip(labels, probabilities, strict=True)}}


def is_causal_lm(model_dir: Path) -> bool:
    """Whether a model directory (plain or adapter: both carry the model's config.json) holds a causal LM."""
    return _is_causal_lm(str(model_dir))


@functools.lru_cache(maxsize=1024)
def _is_causal_lm(model_dir: str) -> bool:
    # Cached: asked once per zero-shot request, and a model directory never changes once written.
    try:
        architectures = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)



class GenerationPredictor:
    """Loads a causal LM once; `generate` completes prompts and `chat` answers conversations, in batches."""

    def __init__(self, model_dir: Path, device: torch.device | None = None, max_seconds: float | None = None) -> None:
        self.device = device or pick_device()
        # Wall-clock limit of one call's generation; past it, sequences end as if at max_tokens ("length").
        self.max_seconds = max_seconds
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token_id is None:
            # Padding is masked out; EOS always exists in a causal LM's vocabulary.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        ensure_chat_template(self.tokenizer)
        self.model: Any = load_pretrained(AutoModelForCausalLM, model_dir)
        self.model.to(self.device)
        self.model.eval()
        self.context_length = _position_limit(self.tokenizer, self.model.config)
        configured = self.model.generation_config.eos_token_id
        configured = configured if isinstance(configured, list) else [configured]
        # Chat models may end a turn with a token other than the tokenizer's EOS; stop on all of them.
        self.stop_ids: list[int] = sorted({int(t) for t in [self.tokenizer.eos_token_id, *configured] if t is not None})
        self.lock = threading.RLock()
        self._label_leans: dict[tuple[str, ...], list[float]] = {}

    def generate(
        self,
        prompts: list[str],
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        n: int = 1,
        batch_size: int = 8,
    ) -> list[list[dict[str, Any]]]:
        """Complete each prompt `n` times: {"text", "finish_reason", "prompt_tokens", "completion_tokens"}.

        Prompts go through the model `batch_size` at a time, left-padded; all share the sampling settings.
        """
        with self.lock:
            encoded = self.encode_prompts(prompts)
            return self._complete(encoded, max_tokens, temperature, top_p, stop, seed, n, batch_size)

    def chat(
        self,
        messages_list: list[list[dict[str, str]]],
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        n: int = 1,
        batch_size: int = 8,
    ) -> list[list[dict[str, Any]]]:
        """Answer each conversation (rendered with the chat template) `n` times, like `generate`."""
        with self.lock:
            encoded = self.encode_chats(messages_list)
            return self._complete(encoded, max_tokens, temperature, top_p, stop, seed, n, batch_size)

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Completion prompts as token IDs (call with the lock held: the tokenizer is not thread-safe)."""
        return [prompt_ids(self.tokenizer, prompt) for prompt in prompts]

    def encode_chats(self, messages_list: list[list[dict[str, str]]]) -> list[list[int]]:
        """Conversations rendered with the chat template, as token IDs ending where the answer starts."""
        for messages in messages_list:
            if not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise ValueError("each conversation must be a non-empty list of {role, content} messages")
        encoded = []
        for messages in messages_list:
            text = self.tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
            # The template writes any BOS itself.
            encoded.append(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        return encoded

    def zero_shot(self, items: list[tuple[str, tuple[str, ...]]], batch_size: int = 8) -> list[dict[str, Any]]:
        """Label each (text, labels) by the likelihood of each label as the model's answer to a question.

        The question (`ZERO_SHOT_QUESTION`, in the chat template) lists the labels; each label's score is the
        log-probability of its tokens as the start of the answer, less the model's lean towards that label
        (its mean score for `CONTENT_FREE_TEXTS`), and the scores are normalised over the labels (softmax):
        {"label", "score", "scores"}, the shape of a classifier's answer.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        with self.lock:
            scores = self._log_likelihoods(items, batch_size)
            leans = {labels: self._label_lean(labels, batch_size) for labels in {labels for _, labels in items}}
        return [labelled(labels, torch.tensor([v - b for v, b in zip(values, leans[labels], strict=True)])
                         .softmax(dim=-1).tolist())
                for (_, labels), values in zip(items, scores, strict=True)]

    def _label_lean(self, labels: tuple[str, ...], batch_size: int) -> list[float]:
        """Each label's mean log-likelihood for the content-free texts (cached per label set)."""
        lean = self._label_leans.get(labels)
        if lean is None:
            free = self._log_likelihoods([(text, labels) for text in CONTENT_FREE_TEXTS], batch_size)
            lean = [sum(column) / len(free) for column in zip(*free, strict=True)]
            self._label_leans[labels] = lean
            while len(self._label_leans) > LABEL_PRIOR_CACHE_SIZE:
                self._label_leans.pop(next(iter(self._label_leans)))
        return lean

    def _log_likelihoods(self, items: list[tuple[str, tuple[str, ...]]], batch_size: int) -> list[list[float]]:
        """log p(label | question about the text) of each item's labels (call with the lock held)."""
        sequences: list[tuple[int, int, list[int], list[int]]] = []
        for i, (text, labels) in enumerate(items):
            prompt = self.encode_chats([[{"role": "user", "content": ZERO_SHOT_QUESTION.format(
                labels=", ".join(labels), text=text)}]])[0]
            for j, label in enumerate(labels):
                answer = list(self.tokenizer(label, add_special_tokens=False)["input_ids"])
                if self.context_length is not None and len(prompt) + len(answer) > self.context_length:
                    raise ValueError(f"input {i}: the text and its question have {len(prompt)} tokens, more "
                                     f"than the model's context of {self.context_length} leaves for a label")
                sequences.append((i, j, prompt, answer))
        log_likelihood = [[0.0] * len(labels) for _, labels in items]
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            for (i, j, _, _), value in zip(chunk, self._answer_log_likelihoods(chunk), strict=True):
                log_likelihood[i][j] = value
        return log_likelihood

    def _answer_log_likelihoods(self, chunk: list[tuple[int, int, list[int], list[int]]]) -> list[float]:
        """log p(answer | prompt) of each (_, _, prompt, answer), in one left-padded forward pass.

        Left padding puts every answer at the end, so only the last positions' logits are computed: the
        vocabulary-wide logits of whole prompts would take gigabytes for a batch of long texts.
        """
        rows = [prompt + answer for _, _, prompt, answer in chunk]
        width = max(len(row) for row in rows)
        keep = max(len(answer) for _, _, _, answer in chunk) + 1
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                logits_to_keep=keep).logits
        log_probs = logits.float().log_softmax(dim=-1)
        values = []
        for r, (_, _, _, answer) in enumerate(chunk):
            # The token at column c is predicted by the logits at column c - 1; the answer fills the last columns.
            first = keep - 1 - len(answer)
            values.append(sum(float(log_probs[r, first + t, token]) for t, token in enumerate(answer)))
        return values

    def check_request(self, encoded: list[list[int]], max_tokens: int, temperature: float, top_p: float,
                      n: int) -> None:
        """Refuse (ValueError) what the model cannot serve as asked: bad sampling values, too long a prompt."""
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0.0 <= temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < top_p <= 1.0:
            raise ValueError("top_p must be greater than 0 and at most 1")
        if n < 1:
            raise ValueError("n must be at least 1")
        for ids in encoded:
            if self.context_length is not None and len(ids) + max_tokens > self.context_length:
                raise ValueError(
                    f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}; together they exceed "
                    f"the model's context of {self.context_length} tokens"
                )

    def _complete(
        self,
        encoded: list[list[int]],
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str] | None,
        seed: int | None,
        n: int,
        batch_size: int,
    ) -> list[list[dict[str, Any]]]:
        self.check_request(encoded, max_tokens, temperature, top_p, n)
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        stops = [s for s in (stop or []) if s]
        config = self._generation_config(max_tokens, temperature, top_p, stops, n)
        deadline = None if self.max_seconds is None else time.monotonic() + self.max_seconds
        # Batching prompts of similar length wastes less compute on padding.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[list[dict[str, Any]]] = [[] for _ in encoded]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            # Forked so a seeded request neither depends on nor shifts the process's random stream.
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                if deadline is not None:
                    # One limit for the whole call: each batch gets what is left (at least one step).
                    config.max_time = max(deadline - time.monotonic(), 1e-3)
                outputs = self._generate_batch([encoded[i] for i in chunk], config, bool(stops))
                for j, i in enumerate(chunk):
                    results[i] = [self._choice(encoded[i], out, stops) for out in outputs[j * n : (j + 1) * n]]
        return results

    def _generation_config(
        self, max_tokens: int, temperature: float, top_p: float, stops: list[str], n: int
    ) -> GenerationConfig:
        sampling: dict[str, Any] = (
            # top_k=0 turns off transformers' default top-50 cut: OpenAI samples with temperature and top_p only.
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            if temperature >= GREEDY_BELOW_TEMPERATURE
            else {"do_sample": False}
        )
        return GenerationConfig(
            max_new_tokens=max_tokens,
            num_return_sequences=n,
            pad_token_id=int(self.tokenizer.pad_token_id),
            eos_token_id=self.stop_ids,
            stop_strings=stops or None,
            **sampling,
        )

    def _generate_batch(self, batch: list[list[int]], config: GenerationConfig, has_stops: bool) -> list[list[int]]:
        """Return the new tokens of each sequence (n per prompt, in prompt order), padded batch removed."""
        width = max(len(ids) for ids in batch)
        pad = int(self.tokenizer.pad_token_id)
        # Left padding: every prompt then ends at the last column, where generation continues.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=self.device)
        extra: dict[str, Any] = {"tokenizer": self.tokenizer} if has_stops else {}
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **extra
            )
        new_tokens: list[list[int]] = output[:, width:].cpu().tolist()
        return new_tokens

    def _choice(self, prompt: list[int], generated: list[int], stops: list[str]) -> dict[str, Any]:
        # A sequence that finished before others in its batch is followed by pad tokens.
        ended = {*self.stop_ids, int(self.tokenizer.pad_token_id)}
        end = next((k for k, token in enumerate(generated) if token in ended), None)
        hit_eos = end is not None and generated[end] in self.stop_ids
        kept = generated if end is None else generated[:end]
        text = self.decode_continuation(prompt, kept)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        # Without an end token or a stop string, generation ran until max_tokens.
        finish = "stop" if end is not None or cut >= 0 else "length"
        return {
            "text": text,
            "finish_reason": finish,
            "prompt_tokens": len(prompt),
            # After a stop string the rest is padding, which may share the EOS id; EOS was not generated then.
            "completion_tokens": len(kept) + (1 if hit_eos and cut < 0 else 0),
        }

    def decode_continuation(self, prompt: list[int], generated: list[int]) -> str:
        # Decoding prompt and continuation together keeps a leading space that some tokenizers drop alone.
        whole: str = self.tokenizer.decode(prompt + generated, skip_special_tokens=True)
        head: str = self.tokenizer.decode(prompt, skip_special_tokens=True)
        tail: str = whole[len(head) :] if whole.startswith(head) else self.tokenizer.decode(
            generated, skip_special_tokens=True)
        # A byte-level model can write a NUL, which Postgres cannot store (the answer's row would never be
        # written, and its caller would wait until the reconciler failed it): it is shown as U+FFFD, as any
        # other byte that is not text.
        return tail.replace("\x00", "\ufffd")
