"""Benchmark: model quality of jobs fine-tuned through the running service, on public data sets.

Each run uploads data over the HTTP API, fine-tunes on the real Celery workers (as `llmos up` runs them),
then scores the fine-tuned model through the inference endpoints, and prints data set, base model, epochs,
rows used, wall time and score:

1. ner:  CoNLL-2003 English with `minilm-l6`; entity-level micro F1 (seqeval, IOB2) on the test split,
         scored from `POST /v1/ner` character offsets mapped back to the test tokens; plus the job's own
         `metrics.f1` on the validation file.
2. sst2: SST-2 with `minilm-l6`; accuracy on the labelled SST test sentences via `POST /v1/classifications`.
3. gen:  SST-2 cast as prompt -> completion with `smollm2-135m-instruct` and LoRA; accuracy of the greedy
         two-token completion via `POST /v1/completions`, zero-shot base accuracy with the same prompt, and
         the job's eval perplexity before and after training.
4. dpo:  preference pairs from SST-2 (the review's right sentiment preferred over the wrong one, as a chat
         reply) with `smollm2-135m-instruct`, `method: dpo` and LoRA; the win rate (share of held-out pairs
         whose preferred reply the model finds likelier) of the base model before and of the tuned one after,
         from the job's metrics on the validation file, plus the reward accuracy and margin.
5. zeroshot: SST-2 dev with no training; accuracy of zero-shot `labels: ["positive", "negative"]` via
         `POST /v1/classifications` on `minilm-l6` (what `/api/llm` answers with no fine-tuned classifier) and on
         `smollm2-135m-instruct` (each label's likelihood as the answer).

Usage:
    python bench/quality.py [--only ner|sst2|gen|dpo|zeroshot] [--train-rows N] [--test-rows N] [--epochs N]
                            [--home DIR]

The defaults subsample so that ner, sst2, gen and zeroshot fit in about half an hour on two shared CPU cores
(dpo adds about 15 minutes: each pair is two replies through the policy and the reference); every
figure is printed next to the rows it used. `--train-rows/--test-rows/--epochs` override each run's
default (use them with `--only`). With LLMOS_DATABASE_URL / LLMOS_BROKER_URL set it uses those servers (a
fresh database, dropped at the end); otherwise embedded ones in a temp dir. `--home DIR` keeps LLMOS_HOME
there, so a rerun reuses the smollm2 model converted from GGUF (about a minute, once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lifecycle import Child, bring_up, machine_facts, percent, scratch_dir, table  # noqa: E402

DATA = Path(os.environ.get("LLMOS_BENCH_DATA", "/work/shared/data"))
CONLL = DATA / "conll2003"
SST2 = DATA / "sst2"
JOB_TIMEOUT = 3 * 3600.0  # a full-data run on two CPU cores takes a while
PROGRESS_EVERY = 15.0  # seconds between progress lines of a running job
WAIT = 600  # Prefer: wait=N for inference calls: a batch on a busy CPU can take a while
SEED = 0
# One torch thread per worker process by default. Measured here with MiniLM-L6 (a token-classification
# step, batch 32 x 40 tokens, on this shared 2-core machine at load ~3.7): 1.57 s/step at 1 thread,
# 2.06 s/step at 2: on shared cores a second thread only adds contention. --torch-threads on a quiet machine.
TORCH_THREADS = 1


@dataclass
class RunSpec:
    """A run's defaults, each overridable from the command line."""

    train_rows: int
    test_rows: int
    epochs: int
    valid_rows: int
    # None: the run's own default (ENCODER_LEARNING_RATE for the ner and sst2 runs).
    learning_rate: float | None = None


# Chosen to fit the ~35 min budget on 2 shared CPU cores (MiniLM ~1.5 s per step of 32 at 40 tokens).
DEFAULTS: dict[str, RunSpec] = {
    "ner": RunSpec(train_rows=3000, test_rows=3453, epochs=2, valid_rows=800),
    "sst2": RunSpec(train_rows=6000, test_rows=1821, epochs=1, valid_rows=872),
    "gen": RunSpec(train_rows=600, test_rows=300, epochs=1, valid_rows=200),
    # Scored on the validation pairs by the job itself; test_rows is that count.
    "dpo": RunSpec(train_rows=300, test_rows=200, epochs=1, valid_rows=200),
    # Nothing trained: the whole dev split is scored, in well under a minute.
    "zeroshot": RunSpec(train_rows=0, test_rows=872, epochs=0, valid_rows=0),
}
# The ner and sst2 runs' learning rate unless --learning-rate says otherwise.
ENCODER_LEARNING_RATE = 1e-4
# The generation base model of gen, dpo and zeroshot.
GEN_BASE = "smollm2-135m-instruct"


@dataclass
class Result:
    name: str
    dataset: str
    model: str
    epochs: int
    rows: str
    train_wall_s: float
    score_wall_s: float
    score_name: str
    score: float
    target: str
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """Sentences of a CoNLL-2003 file as (tokens, IOB2 tags); -DOCSTART- lines are skipped."""
    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if tokens:
                sentences.append((tokens, tags))
            tokens, tags = [], []
            continue
        tokens.append(parts[0])
        tags.append(parts[-1])
    if tokens:
        sentences.append((tokens, tags))
    return sentences


def read_sst2(path: Path) -> list[tuple[str, int]]:
    rows: list[tuple[str, int]] = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:  # header: label\tsentence
        label, sentence = line.split("\t", 1)
        rows.append((sentence.strip(), int(label)))
    return rows


def sample(rows: list[Any], n: int, seed: int = SEED) -> list[Any]:
    """A seeded random subset of n rows (all of them, in order, when n covers the set)."""
    if n >= len(rows):
        return list(rows)
    return random.Random(seed).sample(rows, n)


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


LABELS = {0: "negative", 1: "positive"}


def gen_prompt(sentence: str) -> str:
    return f"Review: {sentence}\nSentiment:"


# --------------------------------------------------------------------------------------------------------
# API helpers
# --------------------------------------------------------------------------------------------------------


def upload(http: httpx.Client, name: str, content: bytes) -> str:
    response = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (name, content)})
    if response.status_code != 200:
        raise RuntimeError(f"upload of {name} answered {response.status_code}: {response.text}")
    file_id: str = response.json()["id"]
    return file_id


def train(http: httpx.Client, tag: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Create a job, print a progress line while it runs, and return the succeeded job and its wall time."""
    response = http.post("/v1/fine_tuning/jobs", json={**body, "seed": SEED})
    started = time.perf_counter()
    if response.status_code != 200:
        raise RuntimeError(f"[{tag}] job creation answered {response.status_code}: {response.text}")
    job_id = response.json()["id"]
    print(f"[{tag}] job {job_id} created: {json.dumps(body.get('method') or body['hyperparameters'])}", flush=True)
    last_print = 0.0
    last_status = ""
    while True:
        elapsed = time.perf_counter() - started
        if elapsed > JOB_TIMEOUT:
            raise RuntimeError(f"[{tag}] job {job_id} did not finish within {JOB_TIMEOUT:.0f}s")
        polled = http.get(f"/v1/fine_tuning/jobs/{job_id}")
        polled.raise_for_status()
        job: dict[str, Any] = polled.json()
        status = job["status"]
        if status == "succeeded":
            print(f"[{tag}] succeeded in {elapsed:.0f}s: metrics {json.dumps(job.get('metrics'))}", flush=True)
            return job, elapsed
        if status in ("failed", "cancelled", "cancelling", "paused"):
            raise RuntimeError(f"[{tag}] job {job_id} ended {status}: {json.dumps(job.get('error'))}")
        progress = job.get("progress") or {}
        if status != last_status or time.perf_counter() - last_print >= PROGRESS_EVERY:
            line = f"[{tag}] {elapsed:6.0f}s {status}"
            if progress:
                line += (f" step {progress.get('step')}/{progress.get('total_steps')} "
                         f"epoch {progress.get('epoch')} ({progress.get('percent')}%) "
                         f"loss {progress.get('train_loss')} {progress.get('samples_per_second')} samples/s")
            print(line, flush=True)
            last_print, last_status = time.perf_counter(), status
        time.sleep(2.0)


def infer(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json=body, headers={"Prefer": f"wait={WAIT}"})
    if response.status_code != 200:
        raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:1000]}")
    answer: dict[str, Any] = response.json()
    return answer


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------


def entities_to_tags(tokens: list[str], entities: list[dict[str, Any]]) -> list[str]:
    """IOB2 tags for `tokens` (joined by single spaces) from character-offset entities.

    A token belongs to an entity when their character spans overlap; the entity's first such token gets
    B-, the rest I-. A token already claimed by an earlier entity keeps its tag.
    """
    spans: list[tuple[int, int]] = []
    offset = 0
    for token in tokens:
        spans.append((offset, offset + len(token)))
        offset += len(token) + 1
    tags = ["O"] * len(tokens)
    for entity in sorted(entities, key=lambda e: int(e["start"])):
        start, end, kind = int(entity["start"]), int(entity["end"]), str(entity["entity_group"])
        first = True
        for i, (a, b) in enumerate(spans):
            if a < end and start < b and tags[i] == "O":
                tags[i] = f"{'B' if first else 'I'}-{kind}"
                first = False
    return tags


def run_ner(http: httpx.Client, spec: RunSpec) -> Result:
    from seqeval.metrics import f1_score, precision_score, recall_score

    train_rows = sample(read_conll(CONLL / "train.txt"), spec.train_rows)
    valid_rows = sample(read_conll(CONLL / "valid.txt"), spec.valid_rows)
    test_rows = sample(read_conll(CONLL / "test.txt"), spec.test_rows)
    train_id = upload(http, "conll-train.jsonl", jsonl([{"tokens": t, "tags": g} for t, g in train_rows]))
    valid_id = upload(http, "conll-valid.jsonl", jsonl([{"tokens": t, "tags": g} for t, g in valid_rows]))
    hp = {"n_epochs": spec.epochs, "batch_size": 16, "learning_rate": spec.learning_rate or ENCODER_LEARNING_RATE,
          "max_seq_length": 128, "warmup_ratio": 0.1}
    job, train_wall = train(http, "ner", {"model": "minilm-l6", "training_file": train_id,
                                          "validation_file": valid_id, "task": "ner", "hyperparameters": hp})
    model = job["fine_tuned_model"]
    started = time.perf_counter()
    gold: list[list[str]] = []
    predicted: list[list[str]] = []
    for chunk in batches(test_rows, 256):
        answer = infer(http, "/v1/ner", {"model": model, "input": [" ".join(t) for t, _ in chunk]})
        for (tokens, tags), item in zip(chunk, sorted(answer["data"], key=lambda d: d["index"]), strict=True):
            gold.append(tags)
            predicted.append(entities_to_tags(tokens, item["entities"]))
    score_wall = time.perf_counter() - started
    metrics = job.get("metrics") or {}
    f1 = float(f1_score(gold, predicted, average="micro"))
    decodings = compare_ner_decodings(http, model, test_rows)
    return Result(
        "ner", "CoNLL-2003 en", "minilm-l6", spec.epochs,
        f"train {len(train_rows)}/14041 sent, valid {len(valid_rows)}/3250, test {len(test_rows)}/3453",
        train_wall, score_wall, "test entity micro F1", f1, ">= 0.88 (BERT-base cased ~0.92)",
        {"test_precision": round(float(precision_score(gold, predicted, average="micro")), 4),
         "test_recall": round(float(recall_score(gold, predicted, average="micro")), 4),
         "job_valid_f1": metrics.get("f1"), "job_valid_per_type": metrics.get("per_type"),
         "hyperparameters": hp, "test_f1_by_decoding": decodings},
    )


def compare_ner_decodings(http: httpx.Client, model: str, rows: list[tuple[list[str], list[str]]]) -> dict[str, float]:
    """Test F1 of the same trained model with each word's likeliest tag on its own (argmax, then read as
    conlleval does) and with the likeliest valid IOB2 sequence (shipped): the model downloaded through the API,
    both scored here in-process, so decoding is the only difference."""
    import io
    import tarfile
    import tempfile

    from seqeval.metrics import f1_score

    from training.predict import NerPredictor

    response = http.get(f"/v1/models/{model}/content", timeout=600)
    response.raise_for_status()
    scores: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="llmos-ner-model-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
            archive.extractall(tmp, filter="data")
        model_dir = next(p.parent for p in Path(tmp).rglob("config.json"))
        gold = [tags for _, tags in rows]
        texts = [" ".join(tokens) for tokens, _ in rows]
        for name, constrained in (("argmax", False), ("constrained", True)):
            predictor = NerPredictor(model_dir, constrained=constrained)
            found = predictor.predict(texts, batch_size=64)
            predicted = [entities_to_tags(tokens, entities) for (tokens, _), entities in zip(rows, found, strict=True)]
            scores[name] = round(float(f1_score(gold, predicted, average="micro")), 4)
    return scores


def run_sst2(http: httpx.Client, spec: RunSpec) -> Result:
    train_rows = sample(read_sst2(SST2 / "train.tsv"), spec.train_rows)
    valid_rows = sample(read_sst2(SST2 / "dev.tsv"), spec.valid_rows)
    test_rows = sample(read_sst2(SST2 / "test.tsv"), spec.test_rows)
    train_id = upload(http, "sst2-train.jsonl", jsonl([{"text": s, "label": LABELS[y]} for s, y in train_rows]))
    valid_id = upload(http, "sst2-dev.jsonl", jsonl([{"text": s, "label": LABELS[y]} for s, y in valid_rows]))
    hp = {"n_epochs": spec.epochs, "batch_size": 32, "learning_rate": spec.learning_rate or ENCODER_LEARNING_RATE,
          "max_seq_length": 128, "warmup_ratio": 0.1}
    job, train_wall = train(http, "sst2", {"model": "minilm-l6", "training_file": train_id,
                                           "validation_file": valid_id, "task": "classification",
                                           "hyperparameters": hp})
    model = job["fine_tuned_model"]
    started = time.perf_counter()
    correct = 0
    for chunk in batches(test_rows, 512):
        answer = infer(http, "/v1/classifications", {"model": model, "input": [s for s, _ in chunk]})
        for (_, y), item in zip(chunk, sorted(answer["data"], key=lambda d: d["index"]), strict=True):
            correct += item["label"] == LABELS[y]
    score_wall = time.perf_counter() - started
    metrics = job.get("metrics") or {}
    return Result(
        "sst2", "SST-2", "minilm-l6", spec.epochs,
        f"train {len(train_rows)}/67349 (phrases+sentences), dev {len(valid_rows)}/872 as validation, "
        f"test {len(test_rows)}/1821 (labelled SST test)",
        train_wall, score_wall, "test accuracy", correct / len(test_rows), ">= 0.88 (BERT-base ~0.93)",
        {"job_dev_accuracy": metrics.get("accuracy"), "job_dev_macro_f1": metrics.get("macro_f1"),
         "hyperparameters": hp},
    )


def generated_accuracy(http: httpx.Client, model: str, rows: list[tuple[str, int]]) -> tuple[float, dict[str, int]]:
    """Share of rows whose greedy two-token completion starts with the right label; plus what was said."""
    correct = 0
    said: dict[str, int] = {}
    for chunk in batches(rows, 64):
        answer = infer(http, "/v1/completions", {"model": model, "prompt": [gen_prompt(s) for s, _ in chunk],
                                                 "max_tokens": 2, "temperature": 0})
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        for (_, y), choice in zip(chunk, choices, strict=True):
            text = choice["text"].strip().lower()
            word = "positive" if text.startswith("pos") else "negative" if text.startswith("neg") else "other"
            said[word] = said.get(word, 0) + 1
            if word == "other" and said[word] <= 3:
                said[f"e.g. {choice['text']!r}"] = 1
            correct += word == LABELS[y]
    return correct / len(rows), said


def run_gen(http: httpx.Client, spec: RunSpec) -> Result:
    base = GEN_BASE
    train_rows = sample(read_sst2(SST2 / "train.tsv"), spec.train_rows)
    valid_rows = sample(read_sst2(SST2 / "dev.tsv"), spec.valid_rows)
    test_rows = sample(read_sst2(SST2 / "test.tsv"), spec.test_rows)

    def pairs(rows: list[tuple[str, int]]) -> bytes:
        return jsonl([{"prompt": gen_prompt(s), "completion": f" {LABELS[y]}"} for s, y in rows])

    started = time.perf_counter()
    zero_shot, zero_said = generated_accuracy(http, base, test_rows)
    zero_wall = time.perf_counter() - started
    print(f"[gen] base zero-shot accuracy {zero_shot:.4f} on {len(test_rows)} test rows ({zero_wall:.0f}s); "
          f"answers {zero_said}", flush=True)
    train_id = upload(http, "sst2-gen-train.jsonl", pairs(train_rows))
    valid_id = upload(http, "sst2-gen-dev.jsonl", pairs(valid_rows))
    hp: dict[str, Any] = {"n_epochs": spec.epochs, "batch_size": 16, "learning_rate": 1e-3, "max_seq_length": 128,
                          "warmup_ratio": 0.1, "lora": True}
    job, train_wall = train(http, "gen", {"model": base, "training_file": train_id, "validation_file": valid_id,
                                          "task": "generation", "hyperparameters": hp})
    started = time.perf_counter()
    tuned, tuned_said = generated_accuracy(http, job["fine_tuned_model"], test_rows)
    score_wall = time.perf_counter() - started
    metrics = job.get("metrics") or {}
    return Result(
        "gen", "SST-2 as prompt->completion", f"{base} + LoRA", spec.epochs,
        f"train {len(train_rows)}/67349, dev {len(valid_rows)}/872 as validation, test {len(test_rows)}/1821",
        train_wall, score_wall, "test accuracy (greedy, 2 tokens)", tuned, "(no reference; vs zero-shot)",
        {"zero_shot_accuracy": round(zero_shot, 4), "zero_shot_answers": zero_said, "tuned_answers": tuned_said,
         "perplexity_before": metrics.get("perplexity_before"), "perplexity_after": metrics.get("perplexity"),
         "hyperparameters": hp},
    )


def dpo_pairs(rows: list[tuple[str, int]]) -> bytes:
    """OpenAI's DPO lines: asked for a review's sentiment, the right word preferred over the wrong one."""
    return jsonl([{
        "input": {"messages": [{"role": "user", "content": f"Is this review positive or negative? Answer with one "
                                                           f"word.\nReview: {s}"}]},
        "preferred_output": [{"role": "assistant", "content": LABELS[y]}],
        "non_preferred_output": [{"role": "assistant", "content": LABELS[1 - y]}],
    } for s, y in rows])


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def run_dpo(http: httpx.Client, spec: RunSpec) -> Result:
    base = GEN_BASE
    train_rows = sample(read_sst2(SST2 / "train.tsv"), spec.train_rows)
    valid_rows = sample(read_sst2(SST2 / "dev.tsv"), spec.test_rows)
    train_id = upload(http, "sst2-dpo-train.jsonl", dpo_pairs(train_rows))
    valid_id = upload(http, "sst2-dpo-dev.jsonl", dpo_pairs(valid_rows))
    hp: dict[str, Any] = {"beta": 0.1, "n_epochs": spec.epochs, "batch_size": 8, "learning_rate": 5e-4,
                          "max_seq_length": 128, "warmup_ratio": 0.1, "lora": True}
    job, train_wall = train(http, "dpo", {"model": base, "training_file": train_id, "validation_file": valid_id,
                                          "method": {"type": "dpo", "dpo": {"hyperparameters": hp}}})
    metrics = job.get("metrics") or {}
    return Result(
        "dpo", "SST-2 as preference pairs", f"{base} + LoRA (DPO)", spec.epochs,
        f"train {len(train_rows)}/67349 pairs, dev {len(valid_rows)}/872 pairs as validation (scored)",
        train_wall, 0.0, "dev win rate (preferred reply likelier)", float(metrics.get("eval_win_rate", 0.0)),
        "(vs the base model's win rate)",
        {"win_rate_before": _rounded(metrics.get("eval_win_rate_before")),
         "reward_accuracy": _rounded(metrics.get("eval_rewards/accuracies")),
         "reward_margin": _rounded(metrics.get("eval_rewards/margins")),
         "eval_loss": _rounded(metrics.get("eval_loss")), "hyperparameters": hp},
    )


def _zero_shot_accuracy(http: httpx.Client, model: str, rows: list[tuple[str, int]], labels: list[str],
                        per_request: int) -> tuple[float, dict[str, int]]:
    correct = 0
    said: dict[str, int] = {}
    for chunk in batches(rows, per_request):
        answer = infer(http, "/v1/classifications", {"model": model, "input": [s for s, _ in chunk], "labels": labels})
        for (_, y), item in zip(chunk, sorted(answer["data"], key=lambda d: d["index"]), strict=True):
            said[item["label"]] = said.get(item["label"], 0) + 1
            correct += item["label"] == LABELS[y]
    return correct / len(rows), said


def run_zeroshot(http: httpx.Client, spec: RunSpec) -> Result:
    rows = sample(read_sst2(SST2 / "dev.tsv"), spec.test_rows)
    labels = [LABELS[1], LABELS[0]]
    started = time.perf_counter()
    accuracy, said = _zero_shot_accuracy(http, "minilm-l6", rows, labels, 256)  # the most inputs one request takes
    score_wall = time.perf_counter() - started
    # The instruct generation model, scored by each label's likelihood as its answer (two passes per sentence).
    started = time.perf_counter()
    gen_accuracy, gen_said = _zero_shot_accuracy(http, GEN_BASE, rows, labels, 16)
    gen_wall = time.perf_counter() - started
    return Result(
        "zeroshot", "SST-2", "minilm-l6 (no training)", 0, f"dev {len(rows)}/872 (no training data used)",
        0.0, score_wall, "dev accuracy (zero-shot labels)", accuracy,
        "(no reference; vs fine-tuned sst2)",
        {"answers": said, "labels": labels, "generation_model": GEN_BASE,
         "generation_accuracy": round(gen_accuracy, 4), "generation_answers": gen_said,
         "generation_wall_s": round(gen_wall)},
    )


RUNS: dict[str, Callable[[httpx.Client, RunSpec], Result]] = {"ner": run_ner, "sst2": run_sst2, "gen": run_gen,
                                                             "dpo": run_dpo, "zeroshot": run_zeroshot}


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", choices=list(RUNS), action="append",
                        help="run only this one (repeatable); default all")
    parser.add_argument("--train-rows", type=int, help="training rows (sentences) per run "
                        f"(defaults: {', '.join(f'{k} {v.train_rows}' for k, v in DEFAULTS.items())})")
    parser.add_argument("--test-rows", type=int, help="test rows scored per run "
                        f"(defaults: {', '.join(f'{k} {v.test_rows}' for k, v in DEFAULTS.items())})")
    parser.add_argument("--epochs", type=int, help="epochs per run "
                        f"(defaults: {', '.join(f'{k} {v.epochs}' for k, v in DEFAULTS.items())})")
    parser.add_argument("--learning-rate", type=float,
                        help=f"learning rate of the ner and sst2 runs (default {ENCODER_LEARNING_RATE})")
    parser.add_argument("--home", type=Path, help="persistent LLMOS_HOME (reuses converted models); default temp")
    parser.add_argument("--torch-threads", type=int, default=TORCH_THREADS,
                        help=f"torch threads per worker process ({TORCH_THREADS}; more only on a quiet machine)")
    args = parser.parse_args(argv)
    for name in ("train_rows", "test_rows", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def spec_for(name: str, args: argparse.Namespace) -> RunSpec:
    d = DEFAULTS[name]
    return RunSpec(train_rows=args.train_rows or d.train_rows, test_rows=args.test_rows or d.test_rows,
                   epochs=args.epochs or d.epochs, valid_rows=d.valid_rows, learning_rate=args.learning_rate)


def report(results: list[Result]) -> None:
    print()
    rows = [["run", "data set", "base model", "epochs", "train s", "score s", "score", "target"]]
    for r in results:
        rows.append([r.name, r.dataset, r.model, str(r.epochs), f"{r.train_wall_s:.0f}", f"{r.score_wall_s:.0f}",
                     f"{r.score_name} {r.score:.4f}", r.target])
    print(table(rows))
    for r in results:
        print(f"{r.name} rows used: {r.rows}")
        if r.name == "ner":
            per_type = {k: round(v["f1"], 3) for k, v in (r.extra["job_valid_per_type"] or {}).items()}
            print(f"ner test P/R {r.extra['test_precision']}/{r.extra['test_recall']}; job metrics.f1 on the "
                  f"validation subsample {r.extra['job_valid_f1']}; its per-type f1 {per_type}")
            print("ner note: minilm-l6 is uncased (capitalisation, the strongest cue for names, is lost) and "
                  "small (6 layers, 384 wide); a cased encoder (bert-base-cased, roberta) with 3+ epochs on all "
                  "14,041 sentences would lift it toward ~0.91-0.92.")
        elif r.name == "sst2":
            print(f"sst2 job metrics on dev: accuracy {r.extra['job_dev_accuracy']}, macro_f1 "
                  f"{r.extra['job_dev_macro_f1']}; SST-2's test.tsv here is labelled, so it is the test split "
                  "(dev.tsv is the validation file)")
        elif r.name == "gen":
            print(f"gen zero-shot base accuracy {r.extra['zero_shot_accuracy']} (answers "
                  f"{r.extra['zero_shot_answers']}) -> fine-tuned {r.score:.4f} (answers {r.extra['tuned_answers']}); "
                  f"eval perplexity before {r.extra['perplexity_before']} -> after {r.extra['perplexity_after']}")
        elif r.name == "dpo":
            print(f"dpo win rate on the validation pairs: base {r.extra['win_rate_before']} -> tuned {r.score:.4f}; "
                  f"reward accuracy {r.extra['reward_accuracy']}, margin {r.extra['reward_margin']}, "
                  f"eval DPO loss {r.extra['eval_loss']} (log 2 = 0.693 before training)")
        elif r.name == "zeroshot":
            print(f"zeroshot: cosine similarity of each sentence to 'This text is {{label}}.' for labels "
                  f"{r.extra['labels']}, no training; answers {r.extra['answers']}. {r.extra['generation_model']} "
                  f"(each label's likelihood as its answer): dev accuracy {r.extra['generation_accuracy']}, answers "
                  f"{r.extra['generation_answers']} ({r.extra['generation_wall_s']} s)")


def run(args: argparse.Namespace, work: Path) -> None:
    facts = machine_facts()
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(f"machine: {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable) {facts['cpu_model']}; "
          f"torch {facts['torch']}; Python {facts['python']}; LLMOS_TORCH_THREADS={args.torch_threads}")
    idle = facts["cpu_idle_before"]
    busy = idle is not None and idle < 0.9
    print(f"CPU idle before start: {percent(facts['cpu_idle_before'])}"
          + (" (shared machine: wall times are inflated)" if busy else ""))
    names = args.only or list(RUNS)
    if args.home is not None:
        # bring_up puts LLMOS_HOME at work/home: point that at the persistent directory.
        args.home.mkdir(parents=True, exist_ok=True)
        (work / "home").symlink_to(args.home.resolve())
    os.environ["LLMOS_CONVERT_GGUF_MODELS"] = "1"
    os.environ["LLMOS_TORCH_THREADS"] = str(args.torch_threads)
    results: list[Result] = []
    failure_logs: list[Child] = []
    with contextlib.ExitStack() as exits:
        try:
            started = time.perf_counter()
            stack = bring_up(exits, work, failure_logs)
            print(f"services: {stack.mode}; stack up in {time.perf_counter() - started:.1f}s "
                  f"(includes smollm2 GGUF conversion on a fresh home)", flush=True)
            from ops.bootstrap import create_key

            key = create_key("quality-bench", ["files", "fine_tuning", "inference"])[1]
            with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"},
                              timeout=WAIT + 60) as http:
                for name in names:
                    spec = spec_for(name, args)
                    print(f"[{name}] train_rows {spec.train_rows}, valid_rows {spec.valid_rows}, "
                          f"test_rows {spec.test_rows}, epochs {spec.epochs}", flush=True)
                    result = RUNS[name](http, spec)
                    print(f"[{name}] {result.score_name} {result.score:.4f} (train {result.train_wall_s:.0f}s, "
                          f"scoring {result.score_wall_s:.0f}s)", flush=True)
                    results.append(result)
        except BaseException:
            for child in failure_logs:
                print(f"--- last lines of {child.name} ({child.log_path}) ---\n{child.tail()}", file=sys.stderr)
            report(results)
            raise
    report(results)
    print(f"CPU idle after stop: {percent(machine_facts()['cpu_idle_before'])}")
    print(json.dumps({"command": shlex.join(["python", *sys.argv]), "services": stack.mode,
                      "results": [{k: v for k, v in r.__dict__.items()} for r in results]}, default=str))


def main(argv: list[str] | None = None) -> None:
    import signal

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with scratch_dir() as work:
        run(args, work)


if __name__ == "__main__":
    main()
