"""Benchmark: our training loop against Hugging Face's `transformers.Trainer`, same model, data and settings.

For each task, one run of our `training/` path and one of `Trainer` with length-grouped sampling
(`train_sampling_strategy="group_by_length"`), alternated for `--rounds` rounds in one process (the side that
goes first swaps every round, so a machine that gets busier or quieter does not favour one side). Each run
is timed end to end, as a user would wait for it: load the base model and tokenizer, tokenise the rows,
train one epoch, write a resumable checkpoint and save the final model. Printed: samples/s of each side per
round, the per-round ratio (ours over Trainer's) and the median ratio, with the machine and the command; beside
them the same ratio over each run's CPU time (this process's, all threads), which other work on a shared
machine moves less than wall time.

Tasks (same model, rows, batch size, epochs, learning rate and schedule, seed and torch thread count):

- classification: `minilm-l6` on SST-2 train sentences (`train_classification` against
  `AutoModelForSequenceClassification` + `DataCollatorWithPadding`).
- ner: `minilm-l6` on CoNLL-2003 train sentences (`train_ner` against `AutoModelForTokenClassification` +
  `DataCollatorForTokenClassification`; both tokenise with `training.ner.encode_ner`).
- generation: LoRA on `smollm2-135m-instruct`, SST-2 sentences as prompt/completion rows (`train_generation`
  against peft's `get_peft_model` + `DataCollatorForSeq2Seq`; both tokenise with `encode_generation`).

The mean training loss of each run is printed beside its speed: the two sides do the same work, so the two
losses should agree to within the noise of a different batch order.

Usage:
    python bench/training.py [--tasks classification,ner,generation] [--rows 1600] [--rounds 3]
                             [--threads 1] [--batch-size 16] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Nothing here may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (the repository root must be on the path first)

from bench.lifecycle import machine_facts, table  # noqa: E402
from training.base_models import MINILM_L6, SMOLLM2_135M, ensure_base_models  # noqa: E402
from training.callbacks import NullCallbacks, StepState  # noqa: E402
from training.devices import autocast_dtype, configure_cpu, pick_device  # noqa: E402

DATA = Path(os.environ.get("LLMOS_BENCH_DATA", "/work/shared/data"))
SST2 = DATA / "sst2"
CONLL = DATA / "conll2003"
SEED = 42
LEARNING_RATE = 5e-5
LORA_LEARNING_RATE = 2e-4
WARMUP_RATIO = 0.1
MAX_SEQ_LENGTH = 128
# Converted once (smollm2 ships as GGUF) and kept between runs; tens of seconds the first time.
MODELS_CACHE = Path(os.environ.get("LLMOS_BENCH_MODELS", Path(tempfile.gettempdir()) / "llmos-bench-models"))
TASKS = ("classification", "ner", "generation")


@dataclass
class Run:
    """One timed run: rows trained per second of wall time and of this process's CPU time, and the mean
    training loss over its steps. On a machine shared with other work the CPU-time figure moves less."""

    samples_per_second: float
    seconds: float
    mean_loss: float
    samples_per_cpu_second: float = 0.0


class LossMean(NullCallbacks):
    """Callbacks that average the per-step training loss, to set beside the Trainer's `train_loss`."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def on_step(self, state: StepState) -> None:
        self.total += state.train_loss
        self.count += 1

    @property
    def mean(self) -> float:
        return self.total / max(1, self.count)


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------


def sst2_rows(n: int) -> list[dict[str, Any]]:
    """A seeded sample of n SST-2 train sentences as classification rows."""
    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]  # header: label\tsentence
    rows = []
    for line in lines:
        label, sentence = line.split("\t", 1)
        rows.append({"text": sentence.strip(), "label": "positive" if label == "1" else "negative"})
    return random.Random(SEED).sample(rows, min(n, len(rows)))


def conll_rows(n: int) -> list[dict[str, Any]]:
    """A seeded sample of n CoNLL-2003 train sentences as NER rows."""
    from training.conll import read_conll

    rows = [row for _, row in read_conll(CONLL / "train.txt")]
    return random.Random(SEED).sample(rows, min(n, len(rows)))


def generation_rows(n: int) -> list[dict[str, Any]]:
    """SST-2 sentences as prompt/completion rows: the review in, its sentiment word out."""
    return [{"prompt": f"Review: {row['text']}\nSentiment:", "completion": f" {row['label']}"}
            for row in sst2_rows(n)]


# --------------------------------------------------------------------------------------------------------
# The two sides
# --------------------------------------------------------------------------------------------------------


def hyperparameters(task: str, batch_size: int, epochs: int) -> dict[str, Any]:
    hp: dict[str, Any] = {
        "n_epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": LORA_LEARNING_RATE if task == "generation" else LEARNING_RATE,
        "max_seq_length": MAX_SEQ_LENGTH,
        "warmup_ratio": WARMUP_RATIO,
        "weight_decay": 0.0,
    }
    if task == "generation":
        hp["lora"] = True
    return hp


def run_ours(task: str, base: Path, rows: list[dict[str, Any]], hp: dict[str, Any], work: Path) -> Run:
    """Our path as a job runs it: train_<task> holding out no rows (so no evaluation)."""
    from training.classification import ClassificationSpec, train_classification
    from training.generation import GenerationSpec, train_generation
    from training.ner import NerSpec, train_ner

    callbacks = LossMean()
    common: dict[str, Any] = {
        "base_model_dir": base, "output_dir": work / "model", "checkpoint_dir": work / "checkpoints",
        "train_rows": rows, "eval_rows": None, "eval_fraction": 0.0, "hyperparameters": hp, "seed": SEED,
    }
    started = time.perf_counter()
    if task == "classification":
        completed = train_classification(ClassificationSpec(**common), callbacks).outcome.completed
    elif task == "ner":
        completed = train_ner(NerSpec(**common), callbacks).outcome.completed
    else:
        completed = train_generation(GenerationSpec(**common), callbacks).outcome.completed
    seconds = time.perf_counter() - started
    if not completed:
        raise RuntimeError(f"our {task} run did not complete")
    return Run(len(rows) * int(hp["n_epochs"]) / seconds, seconds, callbacks.mean)


def run_trainer(task: str, base: Path, rows: list[dict[str, Any]], hp: dict[str, Any], work: Path) -> Run:
    """The same run written the way the transformers examples write it, with length-grouped batches."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    set_seed(SEED)
    model: Any
    features: list[dict[str, Any]]
    collator: Any
    if task == "classification":
        labels = sorted({row["label"] for row in rows})
        label2id = {label: i for i, label in enumerate(labels)}
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id)
        encoded = tokenizer([row["text"] for row in rows], truncation=True, max_length=MAX_SEQ_LENGTH)
        features = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
                     "token_type_ids": encoded["token_type_ids"][i], "labels": label2id[row["label"]]}
                    for i, row in enumerate(rows)]
        collator = DataCollatorWithPadding(tokenizer)
    elif task == "ner":
        from training.ner import encode_ner, ner_label_list, normalise_rows

        normalised = normalise_rows(rows)
        labels = ner_label_list(normalised)
        label2id = {label: i for i, label in enumerate(labels)}
        model = AutoModelForTokenClassification.from_pretrained(
            base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id)
        features, _ = encode_ner(tokenizer, normalised, label2id, MAX_SEQ_LENGTH)
        collator = DataCollatorForTokenClassification(tokenizer)
    else:
        from peft import LoraConfig, TaskType, get_peft_model

        from training.generation import encode_generation
        from training.lora import resolve_lora

        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        lora = resolve_lora(True, str(model.config.model_type))
        assert lora is not None
        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"]))
        features, _ = encode_generation(tokenizer, rows, MAX_SEQ_LENGTH)
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    amp = autocast_dtype(pick_device())
    steps = -(-len(features) // int(hp["batch_size"])) * int(hp["n_epochs"])
    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=int(hp["batch_size"]),
        num_train_epochs=int(hp["n_epochs"]),
        learning_rate=float(hp["learning_rate"]),
        warmup_steps=float(hp["warmup_ratio"]),
        weight_decay=float(hp["weight_decay"]),
        lr_scheduler_type="linear",
        seed=SEED,
        train_sampling_strategy="group_by_length",
        # As our loop: a resumable checkpoint at the epoch's end, about 100 loss points a run.
        save_strategy="epoch",
        logging_strategy="steps",
        logging_steps=max(1, steps // 100),
        report_to="none",
        disable_tqdm=True,
        bf16=amp == torch.bfloat16,
        fp16=amp == torch.float16,
    )
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator,
                      processing_class=tokenizer)
    # Its loss lines would drown the figures; the loss it reports comes back in the result anyway.
    trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    trainer.save_model(str(work / "model"))
    seconds = time.perf_counter() - started
    return Run(len(features) * int(hp["n_epochs"]) / seconds, seconds, float(result.metrics["train_loss"]))


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------


def base_model(task: str) -> Path:
    names = {"classification": MINILM_L6, "ner": MINILM_L6, "generation": SMOLLM2_135M}
    infos = {info.name: info for info in ensure_base_models(MODELS_CACHE, convert_gguf_models=task == "generation")}
    if names[task] not in infos:
        raise SystemExit(f"{task}: base model {names[task]} is not installed")
    return infos[names[task]].path


def bench_task(task: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    base = base_model(task)
    hp = hyperparameters(task, args.batch_size, args.epochs)
    sides: dict[str, Callable[..., Run]] = {"ours": run_ours, "trainer": run_trainer}
    results: dict[str, list[Run]] = {"ours": [], "trainer": []}
    print(f"\n{task}: {len(rows)} rows, batch {args.batch_size}, {args.epochs} epoch(s), "
          f"{args.threads} torch thread(s), {args.rounds} rounds", flush=True)
    for round_index in range(args.rounds):
        order = ["ours", "trainer"] if round_index % 2 == 0 else ["trainer", "ours"]
        for side in order:
            cpu_started = time.process_time()
            with tempfile.TemporaryDirectory(prefix=f"llmos-bench-training-{side}-") as work:
                run = sides[side](task, base, rows, hp, Path(work))
            cpu_seconds = time.process_time() - cpu_started
            run.samples_per_cpu_second = run.samples_per_second * run.seconds / max(cpu_seconds, 1e-9)
            results[side].append(run)
            print(f"  round {round_index + 1} {side:>7}: {run.samples_per_second:6.2f} samples/s "
                  f"({run.seconds:.1f} s; {run.samples_per_cpu_second:.2f} per CPU s; "
                  f"mean loss {run.mean_loss:.4f})", flush=True)
    ratios = [o.samples_per_second / t.samples_per_second
              for o, t in zip(results["ours"], results["trainer"], strict=True)]
    cpu_ratios = [o.samples_per_cpu_second / t.samples_per_cpu_second
                  for o, t in zip(results["ours"], results["trainer"], strict=True)]
    lines = [["round", "ours samples/s", "Trainer samples/s", "ratio", "ratio per CPU s"]]
    for i, (o, t, r, c) in enumerate(zip(results["ours"], results["trainer"], ratios, cpu_ratios, strict=True), 1):
        lines.append([str(i), f"{o.samples_per_second:.2f}", f"{t.samples_per_second:.2f}", f"{r:.2f}x", f"{c:.2f}x"])
    lines.append(["median", f"{statistics.median(r.samples_per_second for r in results['ours']):.2f}",
                  f"{statistics.median(r.samples_per_second for r in results['trainer']):.2f}",
                  f"{statistics.median(ratios):.2f}x", f"{statistics.median(cpu_ratios):.2f}x"])
    print(table(lines))
    return {
        "task": task,
        "rows": len(rows),
        "ours_samples_per_second": [round(r.samples_per_second, 3) for r in results["ours"]],
        "trainer_samples_per_second": [round(r.samples_per_second, 3) for r in results["trainer"]],
        "ours_mean_loss": [round(r.mean_loss, 4) for r in results["ours"]],
        "trainer_mean_loss": [round(r.mean_loss, 4) for r in results["trainer"]],
        "ratios": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "cpu_time_ratios": [round(r, 3) for r in cpu_ratios],
        "median_cpu_time_ratio": round(statistics.median(cpu_ratios), 3),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", default="classification", help="comma-separated: " + ", ".join(TASKS))
    parser.add_argument("--rows", type=int, default=1600, help="training rows per run (1600)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per task (3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (1)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step (16)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the rows (1)")
    args = parser.parse_args(argv)
    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(args.task_list) - set(TASKS))
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Both sides share the process-wide settings: the thread count, and flushing denormals (see
    # ARCHITECTURE.md: without it MiniLM slows 2-4x once the loss falls, whichever loop runs it).
    configure_cpu(args.threads)
    import transformers

    # Load reports (a new head's weights) and progress bars would drown the figures.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator")

    facts = {**machine_facts(), "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
             "device": str(pick_device())}
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print("machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    loaders = {"classification": sst2_rows, "ner": conll_rows, "generation": generation_rows}
    summaries = [bench_task(task, loaders[task](args.rows), args) for task in args.task_list]
    print(json.dumps({"machine": facts, "results": summaries}))


if __name__ == "__main__":
    main()
