"""Benchmark: online inference end to end (API, queue, threaded worker, dynamic batching) against in-process calls.

Measured with real processes (the API and Celery workers as `llmos up` runs them), each figure next to the
load average, since the machine's cores are shared:

1. Classification with a briefly fine-tuned `minilm-l6`: latency p50/p99 of one-text requests at
   concurrency 1 and 32; throughput at concurrency 32 as a ratio of the same model called in-process
   (same torch thread count as the worker) on batches of 32 texts, in the same run.
2. Generation: tokens/s of 16 concurrent /v1/completions requests (they join the model's running decode
   batch as they arrive: continuous batching) as a ratio of the predictor's `generate` (transformers'
   `generate`) on the same 16 prompts in one padded batch; and with `stream: true`, one request's time to
   its first chunk against the time to its whole answer.
3. Batch-file throughput: `bench/batch_file.py`'s `run_batch_benchmark`, when that module exists.
4. Response cache: latency p50/p99 of /v1/embeddings (minilm-l6) misses (distinct texts) and hits (one
   repeated body) at concurrency 1, hits/s at --concurrency, and the API's CPU time per hit.
5. int8 on CPU (`LLMOS_CPU_INT8`): `minilm-l6` fine-tuned through the service on SST-2 train rows, then
   loaded in this process as the model process loads it, float32 and int8 side by side: SST-2 dev accuracy
   (all 872 sentences) and texts/s at batch 32 (rounds alternating float and int8, medians).

Usage:
    python bench/inference.py [--requests 200] [--concurrency 32] [--gen-model tiny-gpt2] [--home DIR]
    python bench/inference.py --home DIR --gen-model smollm2-135m-instruct
    python bench/inference.py --sections cache,int8 [--int8-train-rows 2000]

With LLMOS_DATABASE_URL / LLMOS_BROKER_URL set it uses those servers (a fresh database, dropped at the end);
otherwise embedded ones in a temp dir. `--home DIR` keeps LLMOS_HOME there, so `--gen-model
smollm2-135m-instruct` converts its GGUF file once (about a minute) and reruns reuse it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shlex
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lifecycle import Child, Connection, bring_up, machine_facts, percent, scratch_dir, table  # noqa: E402

TRAIN_ROWS = 120
HYPERPARAMETERS: dict[str, Any] = {"n_epochs": 1, "batch_size": 16, "learning_rate": 5e-5}
JOB_TIMEOUT = 900.0
GEN_PROMPTS = 16
WAIT = "wait=300"
# Requests that measure the model path skip the response cache: the samples repeat.
MODEL_PATH = {"Cache-Control": "no-cache"}


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]  # nearest rank


def texts(n: int) -> list[str]:
    """Distinct review-like texts of varied length."""
    from tests.data import NEGATIVE, POSITIVE, SUBJECTS

    words = POSITIVE + NEGATIVE
    return [f"{SUBJECTS[i % len(SUBJECTS)]} was {words[i % len(words)]}" + " and so on" * (i % 5) + f" ({i})"
            for i in range(n)]


def fine_tune(http: httpx.Client) -> str:
    from tests.data import jsonl, sentiment_rows

    content = jsonl(sentiment_rows(TRAIN_ROWS)).encode()
    file_id = http.post("/v1/files", data={"purpose": "fine-tune"},
                        files={"file": ("train.jsonl", content)}).json()["id"]
    created = http.post("/v1/fine_tuning/jobs", json={"model": "minilm-l6", "training_file": file_id,
                                                      "hyperparameters": HYPERPARAMETERS, "seed": 0})
    if created.status_code != 200:
        raise RuntimeError(f"job creation answered {created.status_code}: {created.text}")
    job_id = created.json()["id"]
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] == "succeeded":
            model_id: str = job["fine_tuned_model"]
            return model_id
        if job["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
        time.sleep(0.5)
    raise RuntimeError(f"job {job_id} did not finish within {JOB_TIMEOUT:.0f}s")


def model_path(model_id: str) -> Path:
    from db.models import Model
    from db.session import transaction

    with transaction() as session:
        row = session.get(Model, model_id)
        if row is None:
            raise RuntimeError(f"no model {model_id}")
        return Path(row.path)


def raw_closed_loop(api_url: str, headers: dict[str, str], bodies: list[bytes], requests: int,
                    concurrency: int, path: str = "/v1/classifications") -> tuple[list[float], float, int]:
    """Like `closed_loop` for POST `path`, on bench/lifecycle.py's cheap raw HTTP client.

    The load generator shares the servers' two cores: this client costs far less CPU per request than
    httpx from 32 threads (see `Connection`), so the figures measure the service, not the client.
    """
    import asyncio

    url = httpx.URL(api_url)
    assert url.port is not None
    host, port = url.host, url.port

    async def load() -> tuple[list[float], float, int]:
        connections = [Connection(host, port, headers) for _ in range(concurrency)]
        latencies: list[float] = []
        issued = 0  # shared by the clients; asyncio switches only at await, so no lock is needed

        async def one_client(connection: Connection) -> None:
            nonlocal issued
            while issued < requests:
                body = bodies[issued % len(bodies)]
                issued += 1
                started = time.perf_counter()
                status, content = await connection.request("POST", path, body)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"{path} answered {status}: {content[:500]!r}")

        started = time.perf_counter()
        try:
            await asyncio.gather(*(one_client(connection) for connection in connections))
        finally:
            for connection in connections:
                await connection.close()
        return latencies, time.perf_counter() - started, len(latencies)

    return asyncio.run(load())


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) so far of each named process with its children, and of this process alone."""
    import psutil

    out: dict[str, float] = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            out[name] = sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])
    # The stack's processes are this one's children: count the load generator on its own.
    out["bench client"] = sum(psutil.Process().cpu_times()[:2])
    # Postgres and Redis, when they run on this machine (embedded or local servers): every process by name.
    for name, process_names in (("postgres", {"postgres"}), ("redis", {"redis-server"})):
        total = 0.0
        for process in psutil.process_iter(["name"]):
            if process.info["name"] in process_names:
                with contextlib.suppress(psutil.Error):
                    # With reaped children's times: Postgres backends of closed connections count too.
                    total += sum(process.cpu_times()[:4])
        if total:
            out[name] = total
    # Everything the machine ran, these and the rest: what the two cores actually had to give.
    out["machine"] = sum(psutil.cpu_times()[:2])
    return out


def classification(http: httpx.Client, model_id: str, args: argparse.Namespace,
                   pids: dict[str, int], worker_log: Path) -> dict[str, Any]:
    from core.settings import get_settings
    from training.devices import configure_cpu
    from training.predict import ClassificationPredictor

    sample = texts(args.requests * 2)

    def classify(i: int) -> int:
        response = http.post("/v1/classifications", json={"model": model_id, "input": sample[i % len(sample)]},
                             headers={"Prefer": WAIT, **MODEL_PATH})
        if response.status_code != 200:
            raise RuntimeError(f"classification answered {response.status_code}: {response.text}")
        return 1

    for i in range(3):  # warm: the model loads on the first request
        classify(i)
    # The baseline: the same model in this process, same torch threads as the worker, batches of 32; taken
    # before and after the online runs, as the shared machine's load drifts.
    configure_cpu(get_settings().torch_threads)
    predictor = ClassificationPredictor(model_path(model_id))
    predictor.predict(sample[:32], batch_size=32)
    baseline_texts = args.requests * 3

    def baseline_items_per_s() -> float:
        started = time.perf_counter()
        for start in range(0, baseline_texts, 32):
            chunk = [sample[(start + j) % len(sample)] for j in range(min(32, baseline_texts - start))]
            predictor.predict(chunk, batch_size=32)
        return baseline_texts / (time.perf_counter() - started)

    before_online = baseline_items_per_s()
    out: dict[str, Any] = {}
    headers = {"Authorization": http.headers["authorization"], "Prefer": WAIT, **MODEL_PATH}
    bodies = [json.dumps({"model": model_id, "input": text}).encode() for text in sample]
    for concurrency in (1, args.concurrency):
        before, log_start = cpu_seconds(pids), log_size(worker_log)
        latencies, wall, items = raw_closed_loop(str(http.base_url).rstrip("/"), headers, bodies,
                                                 args.requests * (1 if concurrency == 1 else 3), concurrency)
        after = cpu_seconds(pids)
        out[f"c{concurrency}"] = {"p50_ms": round(percentile(latencies, 50) * 1000, 1),
                                  "p99_ms": round(percentile(latencies, 99) * 1000, 1),
                                  "items_per_s": round(items / wall, 1), "requests": len(latencies),
                                  "load": load_average(),
                                  "batches": batch_sizes(worker_log, model_id, log_start),
                                  # Where the CPU went, per request.
                                  "cpu_ms_per_request": {name: round((after[name] - before[name]) / len(latencies)
                                                                     * 1000, 1) for name in after if name in before}}

    after_online = baseline_items_per_s()
    out["in_process_batch32_items_per_s_before_after"] = [round(before_online, 1), round(after_online, 1)]
    out["in_process_batch32_items_per_s"] = round((before_online + after_online) / 2, 1)
    out["in_process_load"] = load_average()
    online = out[f"c{args.concurrency}"]["items_per_s"]
    out["throughput_ratio"] = round(online / out["in_process_batch32_items_per_s"], 3)
    return out


def generation(http: httpx.Client, args: argparse.Namespace) -> dict[str, Any]:
    from core.settings import get_settings
    from tests.data import SUBJECTS
    from training.devices import configure_cpu
    from training.predict import GenerationPredictor

    prompts = [f"{SUBJECTS[i % len(SUBJECTS)]} was" + " very" * (i // len(SUBJECTS)) for i in range(GEN_PROMPTS)]
    sampling = {"max_tokens": args.gen_tokens, "temperature": 0}

    def complete(prompt: str) -> int:
        response = http.post("/v1/completions", json={"model": args.gen_model, "prompt": prompt, **sampling},
                             headers={"Prefer": WAIT, **MODEL_PATH})
        if response.status_code != 200:
            raise RuntimeError(f"completion answered {response.status_code}: {response.text}")
        tokens: int = response.json()["usage"]["completion_tokens"]
        return tokens

    complete(prompts[0])  # warm: the model loads on the first request
    configure_cpu(get_settings().torch_threads)
    predictor = GenerationPredictor(model_path(args.gen_model))
    predictor.generate(prompts[:2], **sampling)
    online: list[float] = []
    offline: list[float] = []
    loads: list[str] = []
    # Rounds alternate online and in-process, so both sides meet the same background load on shared cores.
    for _ in range(args.gen_rounds):
        barrier = threading.Barrier(GEN_PROMPTS)

        def together(prompt: str, barrier: threading.Barrier = barrier) -> int:
            barrier.wait(60)
            return complete(prompt)

        started = time.perf_counter()
        with ThreadPoolExecutor(GEN_PROMPTS) as pool:
            tokens = sum(pool.map(together, prompts))
        online.append(tokens / (time.perf_counter() - started))
        loads.append(load_average())
        started = time.perf_counter()
        results = predictor.generate(prompts, batch_size=GEN_PROMPTS, **sampling)
        tokens = sum(c["completion_tokens"] for choices in results for c in choices)
        offline.append(tokens / (time.perf_counter() - started))
    online_median, offline_median = statistics.median(online), statistics.median(offline)
    first_chunk, whole = streamed_latency(http, args.gen_model, prompts[0], args.gen_tokens)
    return {"model": args.gen_model, "max_tokens": args.gen_tokens, "rounds": args.gen_rounds,
            "stream_first_chunk_ms": first_chunk, "stream_whole_ms": whole,
            "online_tokens_per_s": round(online_median, 1), "load": loads,
            "in_process_padded_batch_tokens_per_s": round(offline_median, 1),
            "ratio": round(online_median / offline_median, 3)}


def streamed_latency(http: httpx.Client, model: str, prompt: str, max_tokens: int, rounds: int = 5
                     ) -> tuple[float, float]:
    """Medians over `rounds` streamed requests, one at a time: ms to the first text chunk, ms to `[DONE]`."""
    firsts, wholes = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        first = None
        with http.stream("POST", "/v1/completions", headers={"Prefer": WAIT, **MODEL_PATH},
                         json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                               "stream": True}) as response:
            if response.status_code != 200:
                raise RuntimeError(f"streamed completion answered {response.status_code}: {response.read()!r}")
            for line in response.iter_lines():
                if first is None and line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                    first = time.perf_counter() - started
        wholes.append(time.perf_counter() - started)
        firsts.append(first if first is not None else wholes[-1])
    return round(statistics.median(firsts) * 1000, 1), round(statistics.median(wholes) * 1000, 1)


def decode_admissions(log: Path, model_id: str, since: int = 0) -> dict[str, float]:
    """How requests joined `model_id`'s decode batch (the worker logs each admission) after byte `since`."""
    import re

    text = log_since(log, since)
    found = [(int(m[1]), int(m[2])) for m in re.finditer(
        rf"decode {re.escape(model_id)}: (\d+) requests \(\d+ sequences\) joined (\d+) in flight", text)]
    if not found:
        return {}
    return {"admissions": len(found), "mean_requests": round(statistics.mean(n for n, _ in found), 1),
            "joined_running_batch": sum(1 for _, flight in found if flight > 0),
            "max_in_flight_at_join": max(flight for _, flight in found)}


def response_cache(http: httpx.Client, args: argparse.Namespace, pids: dict[str, int]) -> dict[str, Any]:
    """Misses and hits of the response cache on /v1/embeddings with minilm-l6, measured by the raw client."""
    url = str(http.base_url).rstrip("/")
    headers = {"Authorization": http.headers["authorization"], "Prefer": WAIT}
    path = "/v1/embeddings"
    sample = texts(args.cache_requests)
    warm = http.post(path, json={"model": "minilm-l6", "input": "warm up"}, headers={"Prefer": WAIT})
    if warm.status_code != 200:
        raise RuntimeError(f"embeddings answered {warm.status_code}: {warm.text}")
    out: dict[str, Any] = {"model": "minilm-l6", "endpoint": path}
    hit_body = json.dumps({"model": "minilm-l6", "input": sample[0]}).encode()
    runs = (("miss_c1", [json.dumps({"model": "minilm-l6", "input": t}).encode() for t in sample], 1),
            ("hit_c1", [hit_body], 1), (f"hit_c{args.concurrency}", [hit_body], args.concurrency))
    for name, bodies, concurrency in runs:
        requests = len(bodies) if name.startswith("miss") else args.cache_requests * (1 if concurrency == 1 else 5)
        before = cpu_seconds(pids)
        latencies, wall, items = raw_closed_loop(url, headers, bodies, requests, concurrency, path)
        after = cpu_seconds(pids)
        out[name] = {"requests": items, "p50_ms": round(percentile(latencies, 50) * 1000, 2),
                     "p99_ms": round(percentile(latencies, 99) * 1000, 2), "requests_per_s": round(items / wall, 1),
                     "api_cpu_ms_per_request": round((after["api"] - before["api"]) / items * 1000, 2),
                     "load": load_average()}
    answer = http.post(path, json={"model": "minilm-l6", "input": sample[0]})
    out["hit_header"] = answer.headers.get("x-llmos-cache")
    return out


def int8_accuracy_and_speed(http: httpx.Client, args: argparse.Namespace) -> dict[str, Any]:
    """minilm-l6 fine-tuned on SST-2 rows through the service; float32 and int8 side by side in this process."""
    from bench.quality import LABELS, SST2, read_sst2, sample
    from core.settings import get_settings
    from tasks.serving import load_predictor
    from tests.data import jsonl
    from training.devices import configure_cpu

    train_rows = sample(read_sst2(SST2 / "train.tsv"), args.int8_train_rows)
    dev = read_sst2(SST2 / "dev.tsv")
    content = jsonl([{"text": t, "label": LABELS[y]} for t, y in train_rows]).encode()
    file_id = http.post("/v1/files", data={"purpose": "fine-tune"},
                        files={"file": ("sst2.jsonl", content)}).json()["id"]
    hp = {"n_epochs": 1, "batch_size": 32, "learning_rate": 1e-4, "max_seq_length": 128, "warmup_ratio": 0.1}
    started = time.perf_counter()
    created = http.post("/v1/fine_tuning/jobs", json={"model": "minilm-l6", "training_file": file_id, "seed": 0,
                                                      "task": "classification", "hyperparameters": hp})
    if created.status_code != 200:
        raise RuntimeError(f"job creation answered {created.status_code}: {created.text}")
    job_id = created.json()["id"]
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] == "succeeded":
            break
        if job["status"] in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id}: {job['status']} {job.get('error')}")
        time.sleep(1)
    model_id = job["fine_tuned_model"]
    print(f"int8: fine-tuned {model_id} on {len(train_rows)} SST-2 train rows {hp} in "
          f"{time.perf_counter() - started:.0f}s", flush=True)

    configure_cpu(get_settings().torch_threads)
    path = model_path(model_id)
    # Loaded as the model process loads them (`LLMOS_CPU_INT8` off and on).
    predictors = {"float32": load_predictor("classification", path),
                  "int8": load_predictor("classification", path, int8=True)}
    sentences = [t for t, _ in dev]
    out: dict[str, Any] = {"model": model_id, "train_rows": len(train_rows), "dev_rows": len(dev),
                           "torch_threads": get_settings().torch_threads}
    speeds: dict[str, list[float]] = {name: [] for name in predictors}
    for predictor in predictors.values():
        predictor.predict(sentences[:64], batch_size=32)  # warm
    for _ in range(args.int8_rounds):
        for name, predictor in predictors.items():  # alternating, as the shared machine's load drifts
            round_started = time.perf_counter()
            answers = predictor.predict(sentences, batch_size=32)
            speeds[name].append(len(sentences) / (time.perf_counter() - round_started))
            accuracy = sum(a["label"] == LABELS[y] for a, (_, y) in zip(answers, dev, strict=True)) / len(dev)
            out[name] = {"dev_accuracy": round(accuracy, 4)}
    for name in predictors:
        out[name]["texts_per_s"] = round(statistics.median(speeds[name]), 1)
        out[name]["texts_per_s_rounds"] = [round(v, 1) for v in speeds[name]]
    out["speedup"] = round(out["int8"]["texts_per_s"] / out["float32"]["texts_per_s"], 2)
    out["accuracy_points"] = round((out["int8"]["dev_accuracy"] - out["float32"]["dev_accuracy"]) * 100, 2)
    out["load"] = load_average()
    return out


def log_size(log: Path) -> int:
    return log.stat().st_size if log.exists() else 0


def log_since(log: Path, since: int) -> str:
    """A log's text after byte `since`."""
    with log.open("rb") as f:
        f.seek(since)
        return f.read().decode(errors="replace")


def batch_sizes(log: Path, model_id: str, since: int = 0) -> dict[str, float]:
    """Requests per forward pass the worker logged for `model_id` (its one line per batch) after byte `since`."""
    import re

    text = log_since(log, since)
    found = [(int(m[1]), int(m[2])) for m in re.finditer(
        rf"batch \S+ \S+ {re.escape(model_id)}: (\d+) requests, \d+ inputs, waited \d+ ms, ran (\d+) ms", text)]
    if not found:
        return {}
    sizes = [n for n, _ in found]
    return {"batches": len(sizes), "mean_requests": round(statistics.mean(sizes), 1), "max_requests": max(sizes),
            "mean_ran_ms": round(statistics.mean(ms for _, ms in found), 1)}


def batch_file_section(api_url: str, key: str, model_id: str, lines: int) -> dict[str, Any] | None:
    """Batch-file throughput, from bench/batch_file.py (another engineer's); None while it is missing."""
    # --- batch-file throughput: bench/batch_file.py plugs in here ---
    try:
        module = importlib.import_module("bench.batch_file")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.batch_file":
            raise
        print("batch-file throughput: bench/batch_file.py is missing; not measured")
        return None
    result: dict[str, Any] = module.run_batch_benchmark(api_url, key, model_id, lines)
    print(f"batch-file throughput ({lines} lines, load {load_average()}): {json.dumps(result)}")
    return result


def earlier_sections(http: httpx.Client, args: argparse.Namespace, sections: set[str], pids: dict[str, int],
                     worker_log: Path, api_url: str, key: str
                     ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
    """Sections 1-3: classification and the batch file (on a model fine-tuned here), and generation."""
    cls = gen = batch_file = None
    model_id = None
    if sections & {"classification", "batch-file"}:
        started = time.perf_counter()
        model_id = fine_tune(http)
        print(f"fine-tuned {model_id} ({TRAIN_ROWS} rows, {HYPERPARAMETERS}) in "
              f"{time.perf_counter() - started:.0f}s", flush=True)
    if "classification" in sections and model_id is not None:
        cls = classification(http, model_id, args, pids, worker_log)
        c1, cn = cls["c1"], cls[f"c{args.concurrency}"]
        print(table([
            ["minilm-l6 classification", "p50 ms", "p99 ms", "texts/s", "load 1/5 min"],
            ["concurrency 1", str(c1["p50_ms"]), str(c1["p99_ms"]), str(c1["items_per_s"]), c1["load"]],
            [f"concurrency {args.concurrency}", str(cn["p50_ms"]), str(cn["p99_ms"]),
             str(cn["items_per_s"]), cn["load"]],
            ["in-process, batches of 32 (before/after)", "", "",
             "/".join(map(str, cls["in_process_batch32_items_per_s_before_after"])), cls["in_process_load"]],
        ]))
        print(f"classification throughput at concurrency {args.concurrency} / in-process batch 32: "
              f"{cls['throughput_ratio']:.2f} (target >= 0.7); p50 at concurrency 1: {c1['p50_ms']} ms "
              f"(target < 100); worker batches at concurrency {args.concurrency}: {cn['batches']}")
        print(f"CPU ms per request at concurrency {args.concurrency} (Postgres, Redis: their local processes): "
              f"{cn['cpu_ms_per_request']}; in-process forward pass per text: "
              f"{1000 / cls['in_process_batch32_items_per_s']:.1f} ms")
    if "generation" in sections:
        gen_start = log_size(worker_log)
        gen = generation(http, args)
        gen["admissions"] = decode_admissions(worker_log, args.gen_model, gen_start)
        print(f"generation ({gen['model']}, {GEN_PROMPTS} concurrent requests, max_tokens {gen['max_tokens']}, "
              f"greedy; median of {gen['rounds']} alternating rounds): online {gen['online_tokens_per_s']} tokens/s, "
              f"in-process one padded batch {gen['in_process_padded_batch_tokens_per_s']} tokens/s "
              f"(load {', '.join(gen['load'])}); "
              f"ratio {gen['ratio']:.2f} (target >= 0.8, goal 0.95); decode admissions: {gen['admissions']}; "
              f"streamed, one request: first chunk {gen['stream_first_chunk_ms']} ms, whole answer "
              f"{gen['stream_whole_ms']} ms", flush=True)
    if "batch-file" in sections and model_id is not None:
        batch_file = batch_file_section(api_url, key, model_id, args.batch_lines)
    return cls, gen, batch_file


SECTIONS = ("classification", "generation", "batch-file", "cache", "int8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    # Long enough that the closed loop's ramp-up and drain (fewer than 32 clients in flight) weigh little.
    parser.add_argument("--requests", type=int, default=600,
                        help="classification requests at concurrency 1; three times as many at --concurrency (600)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent classification clients (32)")
    parser.add_argument("--gen-model", default="tiny-gpt2", help="tiny-gpt2 (default) or smollm2-135m-instruct")
    parser.add_argument("--gen-tokens", type=int, default=32, help="max_tokens per completion (32)")
    parser.add_argument("--gen-rounds", type=int, default=5, help="rounds of 16 concurrent completions (5)")
    parser.add_argument("--batch-lines", type=int, default=2000, help="lines of the batch-file section (2000)")
    parser.add_argument("--cache-requests", type=int, default=500,
                        help="response-cache misses and hits at concurrency 1; five times as many hits at "
                             "--concurrency (500)")
    parser.add_argument("--int8-train-rows", type=int, default=2000, help="SST-2 train rows of the int8 run (2000)")
    parser.add_argument("--int8-rounds", type=int, default=3, help="alternating float/int8 rounds over SST-2 dev (3)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)} (all)")
    parser.add_argument("--home", type=Path, help="persistent LLMOS_HOME (reuses converted models); default temp")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, work: Path) -> None:
    command = shlex.join(["python", *sys.argv])
    facts = machine_facts()
    print(f"command: {command}")
    print(f"machine: {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable) {facts['cpu_model']}; "
          f"torch {facts['torch']}; load average {load_average()}; CPU idle before start: "
          f"{percent(facts['cpu_idle_before'])}")
    if args.home is not None:
        args.home.mkdir(parents=True, exist_ok=True)
        (work / "home").symlink_to(args.home.resolve())
    os.environ["LLMOS_CONVERT_GGUF_MODELS"] = "1" if args.gen_model.startswith("smollm2") else "0"
    failure_logs: list[Child] = []
    cls: dict[str, Any] | None = None
    gen: dict[str, Any] | None = None
    batch_file: dict[str, Any] | None = None
    cached: dict[str, Any] | None = None
    int8: dict[str, Any] | None = None
    with contextlib.ExitStack() as exits:
        try:
            stack = bring_up(exits, work, failure_logs)
            from core.settings import get_settings
            from ops.bootstrap import create_key

            settings = get_settings()
            print(f"services: {stack.mode}; inference worker: {settings.inference_concurrency} threads, batch window "
                  f"{settings.inference_batch_window_ms} ms, max batch {settings.inference_max_batch_size}, "
                  f"torch threads {settings.torch_threads}", flush=True)
            key = create_key("inference-bench", ["files", "fine_tuning", "inference", "batches"])[1]
            with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                              limits=httpx.Limits(max_connections=args.concurrency + 8)) as http:
                sections = {name.strip() for name in args.sections.split(",") if name.strip()}
                unknown = sections - set(SECTIONS)
                if unknown:
                    raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
                pids = {name: stack.children[name].popen.pid for name in ("api", "worker-inference")}
                worker_log = stack.children["worker-inference"].log_path
                if sections & {"classification", "generation", "batch-file"}:
                    cls, gen, batch_file = earlier_sections(http, args, sections, pids, worker_log, stack.api_url,
                                                            key)
                if "cache" in sections:
                    cached = response_cache(http, args, pids)
                    miss, hit1, hitn = cached["miss_c1"], cached["hit_c1"], cached[f"hit_c{args.concurrency}"]
                    print(table([
                        ["response cache, /v1/embeddings minilm-l6", "p50 ms", "p99 ms", "requests/s",
                         "API CPU ms/request", "load 1/5 min"],
                        *([label, str(r["p50_ms"]), str(r["p99_ms"]), str(r["requests_per_s"]),
                           str(r["api_cpu_ms_per_request"]), r["load"]]
                          for label, r in (("misses (distinct texts), concurrency 1", miss),
                                           ("hits, concurrency 1", hit1),
                                           (f"hits, concurrency {args.concurrency}", hitn))),
                    ]))
                    print(f"cache hit p50 {hit1['p50_ms']} ms at concurrency 1, client included (target < 2 ms "
                          f"in the API); hits/misses throughput at concurrency 1: "
                          f"{hit1['requests_per_s'] / miss['requests_per_s']:.1f}x", flush=True)
                if "int8" in sections:
                    int8 = int8_accuracy_and_speed(http, args)
                    f32, q8 = int8["float32"], int8["int8"]
                    print(table([
                        [f"{int8['model']} on SST-2 dev ({int8['dev_rows']} rows)", "accuracy", "texts/s (median)",
                         "rounds", "torch threads"],
                        ["float32", str(f32["dev_accuracy"]), str(f32["texts_per_s"]),
                         str(f32["texts_per_s_rounds"]), str(int8["torch_threads"])],
                        ["int8 (LLMOS_CPU_INT8=1)", str(q8["dev_accuracy"]), str(q8["texts_per_s"]),
                         str(q8["texts_per_s_rounds"]), str(int8["torch_threads"])],
                    ]))
                    print(f"int8 / float32 texts/s: {int8['speedup']}x (target >= 1.5); accuracy change "
                          f"{int8['accuracy_points']:+.2f} points (target within 0.5); load {int8['load']}", flush=True)
        except BaseException:
            for child in failure_logs:
                print(f"--- last lines of {child.name} ({child.log_path}) ---\n{child.tail()}", file=sys.stderr)
            raise
    print(json.dumps({"command": command, "services": stack.mode, "classification": cls, "generation": gen,
                      "batch_file": batch_file, "response_cache": cached, "int8": int8}))


def main(argv: list[str] | None = None) -> None:
    import signal

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with scratch_dir() as work:
        run(args, work)


if __name__ == "__main__":
    main()
