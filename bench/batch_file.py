"""Benchmark: a classification batch file through /v1/batches against the model's in-process ceiling.

One run, on this machine, with real processes (the API and Celery workers as `llmos up` runs them):

1. Batch: N SST-2 sentences (read from /work/shared/data/sst2, never copied into the repository) as a
   batch file of `/v1/classifications` lines; upload, create the batch, poll until it completes. The
   figure is lines per second from the create call to the batch reading `completed` (validation,
   every chunk, finalising the output file), polled every 200 ms (polls cost the API and Postgres CPU that
   the worker would otherwise get on a small machine).
2. Ceiling: the same fine-tuned model (downloaded through `GET /v1/models/{id}/content`) loaded in this
   process with the same torch thread count as a worker, predicting the same texts at batch size 32;
   timed right before and right after the batch and averaged, so drift in the machine's load hits both.

The ratio batch / ceiling says how much of the model's own speed the batch machinery keeps (target >= 0.8
at 10,000 lines).

Usage:
    python bench/batch_file.py [--lines 10000] [--model tiny-bert]

With LLMOS_DATABASE_URL / LLMOS_BROKER_URL set it uses those servers (a fresh database, dropped at the
end); otherwise it starts embedded Postgres and Redis in a temp dir. `run_batch_benchmark` is importable
on its own against any running stack (bench/inference.py calls it).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import shlex
import signal
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
SST2 = Path("/work/shared/data/sst2/train.tsv")
POLL_INTERVAL = 0.2
BATCH_TIMEOUT = 3600.0
CEILING_BATCH_SIZE = 32
TRAIN_HYPERPARAMETERS: dict[str, Any] = {"n_epochs": 2, "batch_size": 16}
FINAL = {"completed", "failed", "expired", "cancelled"}


def sst2_sentences(n: int, path: Path = SST2) -> list[str]:
    """The first ``n`` SST-2 training sentences (cycled when ``n`` exceeds the file)."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = [row["sentence"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if not rows:
        raise RuntimeError(f"{path} holds no sentences")
    return [rows[i % len(rows)] for i in range(n)]


def sst2_training_rows(n: int, path: Path = SST2) -> list[dict[str, str]]:
    """Labelled rows for a quick fine-tune, taken from the end of the file (the batch reads from the start)."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"text": r["sentence"], "label": "positive" if r["label"] == "1" else "negative"} for r in rows[-n:]]


def _download_model(http: httpx.Client, model_id: str, into: Path) -> Path:
    response = http.get(f"/v1/models/{model_id}/content")
    if response.status_code != 200:
        raise RuntimeError(f"model download answered {response.status_code}: {response.text[:300]}")
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        archive.extractall(into, filter="data")
    (model_dir,) = [p for p in into.iterdir() if p.is_dir()]
    return model_dir


def _ceiling(model_dir: Path, texts: list[str]) -> float:
    """Seconds the model itself needs for ``texts`` at batch 32, warm, with a worker's thread count."""
    from core.settings import get_settings
    from training.devices import configure_cpu
    from training.predict import ClassificationPredictor

    configure_cpu(get_settings().torch_threads)
    predictor = ClassificationPredictor(model_dir)
    predictor.predict(texts[:CEILING_BATCH_SIZE], batch_size=CEILING_BATCH_SIZE)  # warm-up
    started = time.perf_counter()
    predictor.predict(texts, batch_size=CEILING_BATCH_SIZE)
    return time.perf_counter() - started


def run_batch_benchmark(api_url: str, key: str, model_id: str, lines: int) -> dict[str, Any]:
    """Run ``lines`` SST-2 classification lines through /v1/batches and the model's in-process ceiling.

    ``model_id`` is a fine-tuned classification model the key's tenant owns (it is downloaded for the
    ceiling). Returns lines/s of both, their ratio, and the batch's own timestamps and counts.
    """
    texts = sst2_sentences(lines)
    content = "".join(json.dumps({"custom_id": f"sst2-{i}", "method": "POST", "url": "/v1/classifications",
                                  "body": {"model": model_id, "input": text}}) + "\n" for i, text in enumerate(texts))
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http, \
            tempfile.TemporaryDirectory(prefix="llmos-bench-model-") as scratch:
        # One online request first, so the worker's model load is not counted against the batch.
        warm = http.post("/v1/classifications", json={"model": model_id, "input": texts[0]})
        if warm.status_code != 200:
            raise RuntimeError(f"warm-up classification answered {warm.status_code}: {warm.text[:300]}")
        model_dir = _download_model(http, model_id, Path(scratch))
        # The ceiling is taken right before and right after the batch, and averaged: on a shared machine
        # the load drifts, and bracketing the batch exposes both sides to the same drift.
        ceiling_before = _ceiling(model_dir, texts)
        uploaded = http.post("/v1/files", data={"purpose": "batch"},
                             files={"file": ("sst2-batch.jsonl", content.encode())})
        if uploaded.status_code != 200:
            raise RuntimeError(f"upload answered {uploaded.status_code}: {uploaded.text[:300]}")
        file_id = uploaded.json()["id"]
        started = time.perf_counter()
        created = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/classifications",
                                                 "completion_window": "24h"})
        if created.status_code != 200:
            raise RuntimeError(f"batch creation answered {created.status_code}: {created.text[:300]}")
        batch_id = created.json()["id"]
        in_progress_after: float | None = None
        deadline = started + BATCH_TIMEOUT
        while True:
            batch = http.get(f"/v1/batches/{batch_id}").json()
            seen = time.perf_counter() - started
            if in_progress_after is None and batch["status"] != "validating":
                in_progress_after = seen
            if batch["status"] in FINAL:
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"batch {batch_id} did not finish within {BATCH_TIMEOUT:.0f}s")
            time.sleep(POLL_INTERVAL)
        batch_seconds = seen
        if batch["status"] != "completed" or batch["request_counts"]["completed"] != lines:
            raise RuntimeError(f"batch {batch_id} ended {batch['status']}: {batch['request_counts']} "
                               f"{batch['errors']}")
        output = http.get(f"/v1/files/{batch['output_file_id']}/content")
        output_lines = output.text.count("\n")
        ceiling_after = _ceiling(model_dir, texts)
    ceiling_seconds = (ceiling_before + ceiling_after) / 2
    batch_rate = lines / batch_seconds
    ceiling_rate = lines / ceiling_seconds
    return {
        "lines": lines,
        "model": model_id,
        "batch_id": batch_id,
        "batch_seconds": round(batch_seconds, 3),
        "validating_seconds": round(in_progress_after or 0.0, 3),
        "batch_lines_per_s": round(batch_rate, 1),
        "ceiling_seconds": round(ceiling_seconds, 3),
        "ceiling_seconds_before_after": [round(ceiling_before, 3), round(ceiling_after, 3)],
        "ceiling_lines_per_s": round(ceiling_rate, 1),
        "ceiling_batch_size": CEILING_BATCH_SIZE,
        "ratio": round(batch_rate / ceiling_rate, 3),
        "output_lines": output_lines,
        "request_counts": batch["request_counts"],
    }


def fine_tune(http: httpx.Client, base_model: str, rows: int = 256) -> str:
    """A quick SST-2 classifier on ``base_model``; returns the fine-tuned model id."""
    from tests.data import jsonl

    upload = http.post("/v1/files", data={"purpose": "fine-tune"},
                       files={"file": ("sst2-train.jsonl", jsonl(sst2_training_rows(rows)).encode())})
    upload.raise_for_status()
    job = http.post("/v1/fine_tuning/jobs", json={"model": base_model, "training_file": upload.json()["id"],
                                                  "seed": 7, "hyperparameters": TRAIN_HYPERPARAMETERS})
    if job.status_code != 200:
        raise RuntimeError(f"job creation answered {job.status_code}: {job.text[:300]}")
    job_id = job.json()["id"]
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        state = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if state["status"] == "succeeded":
            model: str = state["fine_tuned_model"]
            return model
        if state["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"fine-tuning {job_id} ended {state['status']}: {state['error']}")
        time.sleep(0.5)
    raise RuntimeError(f"fine-tuning {job_id} did not finish in time")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=10_000, help="batch lines (10000)")
    parser.add_argument("--model", default="tiny-bert", help="base encoder to fine-tune (tiny-bert)")
    args = parser.parse_args(argv)
    if args.lines < 1:
        parser.error("--lines must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from bench.lifecycle import Child, bring_up, machine_facts, percent, scratch_dir

    command = shlex.join(["python", *sys.argv])
    facts = machine_facts()
    print(f"command: {command}")
    print(f"machine: {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable) {facts['cpu_model']}; "
          f"torch {facts['torch']}; Python {facts['python']}")
    print(f"CPU idle before start: {percent(facts['cpu_idle_before'])}")
    failure_logs: list[Child] = []
    with scratch_dir() as work, contextlib.ExitStack() as exits:
        try:
            stack = bring_up(exits, work, failure_logs)
            from ops.bootstrap import create_key

            key = create_key("bench", ["files", "fine_tuning", "batches", "inference"])[1]
            with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"},
                              timeout=120) as http:
                model_id = fine_tune(http, args.model)
            result = run_batch_benchmark(stack.api_url, key, model_id, args.lines)
        except Exception:
            for child in failure_logs:
                print(f"--- last lines of {child.name} ({child.log_path}) ---\n{child.tail()}", file=sys.stderr)
            raise
    print()
    from core.settings import get_settings

    print(f"Batch of {result['lines']} SST-2 classification lines on {result['model']} "
          f"(chunks of {get_settings().batch_chunk_lines} lines)")
    print(f"  /v1/batches, create -> completed: {result['batch_seconds']:.2f} s "
          f"({result['batch_lines_per_s']:.0f} lines/s; validation {result['validating_seconds']:.2f} s)")
    before, after = result["ceiling_seconds_before_after"]
    print(f"  in-process predictor, batch {CEILING_BATCH_SIZE}:  {result['ceiling_seconds']:.2f} s "
          f"({result['ceiling_lines_per_s']:.0f} lines/s; {before:.2f} s before, {after:.2f} s after)")
    print(f"  ratio batch / ceiling: {result['ratio']:.2f}")
    print(json.dumps({"command": command, "machine": facts, **result}))


if __name__ == "__main__":
    main()
