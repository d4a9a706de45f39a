"""LoRA adapters (via peft): hyperparameters, wrapping a model for run_training, saving and loading.

``hyperparameters["lora"]`` is ``true`` (defaults) or ``{"r", "alpha", "dropout", "target_modules"}``.
Only the adapter matrices train, plus a new classification/NER head (peft's ``modules_to_save``).

A fine-tuned LoRA model directory holds peft's adapter files (``adapter_config.json``,
``adapter_model.safetensors``), the fine-tuned ``config.json``, the tokenizer, and ``llmos_adapter.json``
naming the base model directory; ``load_pretrained`` loads base plus adapter, merged, for inference.

Checkpoints: run_training saves ``model.save_pretrained(dir)`` and restores ``model.safetensors`` (or the
files a ``model.safetensors.index.json`` names). ``LoraModule`` saves the adapter plus such an index that
points at ``adapter_model.safetensors``, and restores only the adapter weights, so a checkpoint holds
megabytes instead of the whole frozen base model and a resumed run still continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors import safe_open
from torch.nn.modules.module import _IncompatibleKeys
from transformers import AutoConfig, PreTrainedModel

from training.fsutil import replace_dir, temp_dir_beside

log = logging.getLogger(__name__)

ADAPTER_MANIFEST = "llmos_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The file run_training's checkpoint loader reads to find weights stored under another name.
_WEIGHTS_INDEX = "model.safetensors.index.json"
# Adapters train far fewer weights than a full fine-tune and want a larger step (peft's examples: 1e-4..3e-4).
LORA_LEARNING_RATE = 2e-4
DEFAULT_R = 8
DEFAULT_ALPHA = 16
DEFAULT_DROPOUT = 0.05
# The attention projections: the usual LoRA targets, and peft's own defaults for these architectures.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
}
_LORA_KEYS = ("r", "alpha", "dropout", "target_modules")

LoraTask = Literal["classification", "ner", "generation"]
_TASK_TYPES: dict[str, TaskType] = {
    "classification": TaskType.SEQ_CLS,
    "ner": TaskType.TOKEN_CLS,
    "generation": TaskType.CAUSAL_LM,
}


# --- hyperparameters -----------------------------------------------------------------------------


def _is_auto(value: Any) -> bool:
    return value is None or value == "auto"


def resolve_lora(value: Any, model_type: str | None = None) -> dict[str, Any] | None:
    """Return concrete LoRA settings for `hyperparameters["lora"]`, or None when LoRA is off.

    `target_modules` stays "auto" unless `model_type` is given; apply_lora fills it in from the model.
    """
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"lora must be true, false or an object with {', '.join(_LORA_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(_LORA_KEYS))
    if unknown:
        raise ValueError(f"lora has unknown keys {unknown}; expected {', '.join(_LORA_KEYS)}")
    r = value.get("r")
    if _is_auto(r):
        r = DEFAULT_R
    if isinstance(r, float) and r.is_integer():
        r = int(r)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 1024:
        raise ValueError(f"lora.r must be an integer between 1 and 1024, got {r!r}")
    alpha = value.get("alpha")
    alpha = DEFAULT_ALPHA if _is_auto(alpha) else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora.alpha must be a positive number, got {alpha!r}")
    dropout = value.get("dropout")
    dropout = DEFAULT_DROPOUT if _is_auto(dropout) else dropout
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora.dropout must be a number in [0, 1), got {dropout!r}")
    targets = value.get("target_modules")
    if _is_auto(targets):
        targets = default_target_modules(model_type) if model_type is not None else "auto"
    elif targets == "all-linear":
        pass
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t.strip() for t in targets)):
        raise ValueError(
            f'lora.target_modules must be a non-empty list of module names, "all-linear" or "auto", got {targets!r}'
        )
    return {
        "r": r,
        # peft expects an integer alpha, but a fractional one works and is sometimes wanted.
        "alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "dropout": float(dropout),
        "target_modules": list(targets) if isinstance(targets, list) else targets,
    }


def add_lora_hyperparameters(resolved: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
    """Add the resolved `lora` entry of raw `hp` to `resolved`, with LoRA's larger default learning rate."""
    lora = resolve_lora(hp.get("lora"))
    if lora is None:
        return resolved
    out = {**resolved, "lora": lora}
    if _is_auto(hp.get("learning_rate")):
        multiplier = hp.get("learning_rate_multiplier")
        # classification.resolve_hyperparameters has already checked the multiplier is a number.
        out["learning_rate"] = LORA_LEARNING_RATE * (1.0 if multiplier is None or multiplier == "auto" else multiplier)
    return out


def default_target_modules(model_type: str) -> list[str]:
    """Return the modules LoRA adapts by default for a transformers `model_type`."""
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    raise ValueError(f'no default LoRA target modules for model type "{model_type}"; set lora.target_modules')


# --- training ------------------------------------------------------------------------------------


class LoraModule(torch.nn.Module):
    """A peft model that run_training can checkpoint and resume: only adapter weights go to disk."""

    def __init__(self, peft_model: PeftModel, base_model_dir: Path, task: LoraTask, lora: dict[str, Any]) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.base_model_dir = base_model_dir
        self.task = task
        self.lora = lora

    @property
    def config(self) -> Any:
        """The wrapped transformers model's config."""
        return self.peft_model.get_base_model().config

    def forward(self, **kwargs: Any) -> Any:
        """Run the adapted model; takes and returns what the transformers model does."""
        return self.peft_model(**kwargs)

    def save_adapter(self, directory: Path) -> None:
        """Write the adapter, the fine-tuned config and the manifest: a loadable model directory."""
        directory.mkdir(parents=True, exist_ok=True)
        self.peft_model.save_pretrained(str(directory))
        # peft also writes a model card of placeholders; it would only clutter the downloadable model.
        (directory / "README.md").unlink(missing_ok=True)
        # Labels, pad token and the like live in the config; the base model's own config lacks them.
        self.config.save_pretrained(str(directory))
        manifest = {
            "format": 1,
            "base_model_dir": str(Path(self.base_model_dir).resolve()),
            "task": self.task,
            "lora": self.lora,
        }
        (directory / ADAPTER_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")

    def save_pretrained(self, directory: Path) -> None:
        """Save as save_adapter does, plus the weights index run_training's checkpoint loader follows."""
        self.save_adapter(directory)
        with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt") as handle:
            names = list(handle.keys())
        index = {"metadata": {"format": "llmos-lora"}, "weight_map": dict.fromkeys(names, ADAPTER_WEIGHTS)}
        (directory / _WEIGHTS_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load adapter weights as saved by save_pretrained; the frozen base comes from the base model dir."""
        expected = set(get_peft_model_state_dict(self.peft_model))
        missing = sorted(expected - set(state_dict))
        if missing:
            raise ValueError(f"the checkpoint lacks adapter weights: {missing[:5]}")
        unexpected = sorted(set(state_dict) - expected)
        set_peft_model_state_dict(self.peft_model, {k: state_dict[k] for k in expected})
        return _IncompatibleKeys([], unexpected)


def _checkpoint_keys(model_dir: Path) -> set[str]:
    """Return the tensor names stored in a save_pretrained directory's safetensors files (empty if none)."""
    index = model_dir / _WEIGHTS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return set(weight_map)
    single = model_dir / "model.safetensors"
    if not single.is_file():
        return set()
    with safe_open(str(single), framework="pt") as handle:
        return set(handle.keys())


def new_modules(model: PreTrainedModel, base_model_dir: Path) -> list[str]:
    """Return the modules of `model` whose weights the base checkpoint lacks: freshly initialised ones."""
    stored = _checkpoint_keys(Path(base_model_dir)) if not is_adapter_dir(base_model_dir) else set()
    if not stored:
        return []
    # A checkpoint saved from the bare encoder names weights without the task model's prefix, and vice versa.
    prefix = f"{model.base_model_prefix}."
    fresh = {
        name.rsplit(".", 1)[0]
        for name, _ in model.named_parameters()
        if name not in stored and name.removeprefix(prefix) not in stored and prefix + name not in stored
    }
    return sorted(fresh)


def apply_lora(model: PreTrainedModel, lora: dict[str, Any], task: LoraTask, base_model_dir: Path) -> LoraModule:
    """Freeze `model` and add LoRA adapters; freshly initialised modules (the new head) stay trainable.

    A classification model built on a checkpoint without a pooler gets a random pooler, for example:
    frozen, it would blur every input into one vector, so it trains (and is saved) with the head.
    """
    model_type = str(model.config.model_type)
    settings = resolve_lora(lora, model_type)
    if settings is None:
        raise ValueError("apply_lora needs LoRA settings, got none")
    config = LoraConfig(
        task_type=_TASK_TYPES[task],
        r=int(settings["r"]),
        lora_alpha=settings["alpha"],
        lora_dropout=float(settings["dropout"]),
        target_modules=settings["target_modules"],
        # GPT-2's Conv1D stores weights transposed; peft warns and flips this itself otherwise.
        fan_in_fan_out=model_type == "gpt2",
        modules_to_save=new_modules(model, base_model_dir) or None,
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA on %s (%s): %d of %d parameters trainable", model_type, settings, trainable, total)
    return LoraModule(peft_model, base_model_dir, task, settings)


# --- model directories ---------------------------------------------------------------------------


def is_adapter_dir(path: Path) -> bool:
    """True when `path` is a LoRA model directory written by LoraModule."""
    return (Path(path) / ADAPTER_MANIFEST).is_file()


def read_adapter_manifest(path: Path) -> dict[str, Any]:
    """Return the parsed llmos_adapter.json of an adapter directory."""
    manifest: dict[str, Any] = json.loads((Path(path) / ADAPTER_MANIFEST).read_text(encoding="utf-8"))
    return manifest


def load_pretrained(auto_class: Any, model_dir: Path, dtype: torch.dtype | None = None, **config: Any) -> Any:
    """Load `model_dir` with a transformers Auto class; an adapter dir loads its base plus adapter, merged.

    `config` overrides config attributes (num_labels, id2label, ...), as from_pretrained's kwargs do.
    """
    chain: list[Path] = []
    current = Path(model_dir)
    while is_adapter_dir(current):
        chain.append(current)
        current = Path(read_adapter_manifest(current)["base_model_dir"])
        if len(chain) > 16:
            raise ValueError(f"{model_dir}: adapter chain too long (a loop in {ADAPTER_MANIFEST}?)")
    dtype_kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if not chain:
        return auto_class.from_pretrained(current, **dtype_kwargs, **config)
    # The outermost adapter's config describes the fine-tuned model (labels, pad token).
    merged_config = AutoConfig.from_pretrained(chain[0], **config)
    model = auto_class.from_pretrained(current, config=merged_config, **dtype_kwargs)
    for adapter_dir in reversed(chain):
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    # peft froze the weights while the adapter was attached; a plain from_pretrained leaves them trainable.
    model.requires_grad_(True)
    return model


def save_model_dir(model: torch.nn.Module, tokenizer: Any, output_dir: Path, files: dict[str, str]) -> None:
    """Write a fine-tuned model directory atomically: weights (or adapter), tokenizer and `files` (name: text)."""
    tmp = temp_dir_beside(output_dir)
    try:
        if isinstance(model, LoraModule):
            model.save_adapter(tmp)
        elif isinstance(model, PreTrainedModel):
            model.save_pretrained(tmp)
        else:
            raise TypeError(f"cannot save a {type(model).__name__}")
        tokenizer.save_pretrained(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
