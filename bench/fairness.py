"""Benchmark: fair training admission between tenants, and what rate limits cost a request.

Two measurements on this machine with real processes (the API and Celery workers as `llmos up` runs them,
one training worker), printed as tables and one JSON line at the end:

1. Waits: a heavy tenant submits `--heavy` jobs (50), then a light tenant submits `--light` (5). The same
   workload runs twice, with the scheduler switched to `fifo` (the training and cpu workers restarted
   with LLMOS_SCHEDULER=fifo, so validation is first come, first served too) and to `fair`; for each
   tenant, p50/p95 of the wait from submit to running (the job's creation to its first claim, from
   Postgres' own timestamps), in seconds and in job lengths
   (one job's turn on the worker: the run's span from first claim to last release over its job count).
   Target: the light tenant's p95 is at most one running job plus its own queue.
2. Fair inference: one tenant floods the inference worker with `--flood` concurrent completion callers
   while another sends requests one at a time; the light caller's p50/p95 latency alone, beside the flood
   with its own key (its own lane in the worker's batcher, served in turn), and beside the flood with the
   flooding tenant's key (one lane: first come, first served, the baseline).
3. The limiter's cost: `GET /v1/fine_tuning/jobs/{id}` throughput for a tenant with rate limits (one Redis
   round trip per request) against one without (rpm 0), alternated in the same run.

Usage:
    python bench/fairness.py [--phases waits,inference,limits] [--heavy 50] [--light 5] [--flood 32]
                             [--requests 3000] [--concurrency 32]

Servers as in bench/lifecycle.py: LLMOS_DATABASE_URL / LLMOS_BROKER_URL when set, else embedded ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.lifecycle import (  # noqa: E402  (the repository root must be on the path first)
    Child,
    bring_up,
    machine_facts,
    measure,
    percent,
    scratch_dir,
    table,
    wait_until,
    workers_ready,
)

ROWS = 40
HYPERPARAMETERS = {"n_epochs": 1, "batch_size": 8}
# Comparing throughput with and without limits, each side measured this many times, alternating.
ROUNDS = 5


def create_tenant(name: str, **limits: Any) -> dict[str, str]:
    from db.session import transaction
    from domain import tenants
    from ops.bootstrap import create_key

    key = create_key(name, ["files", "fine_tuning", "inference", "webhooks"])[1]
    if limits:
        with transaction() as session:
            tenants.set_limits(session, name=name, **limits)
    return {"Authorization": f"Bearer {key}"}


def upload(http: httpx.Client) -> str:
    from tests.data import jsonl, sentiment_rows

    response = http.post("/v1/files", data={"purpose": "fine-tune"},
                         files={"file": ("train.jsonl", jsonl(sentiment_rows(ROWS)).encode())})
    response.raise_for_status()
    file_id: str = response.json()["id"]
    return file_id


def submit(http: httpx.Client, file_id: str, count: int) -> list[str]:
    out = []
    for _ in range(count):
        response = http.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-bert", "training_file": file_id, "hyperparameters": HYPERPARAMETERS})
        if response.status_code != 200:
            raise RuntimeError(f"job creation answered {response.status_code}: {response.text}")
        out.append(response.json()["id"])
    return out


def timings(job_ids: list[str]) -> dict[str, tuple[float, float, float]]:
    """Per job: seconds from creation to its first claim, and its first claim and last release as offsets
    from the first claim of the run."""
    from sqlalchemy import func, select

    from db.models import FineTuningJob, JobClaim
    from db.session import transaction

    with transaction() as session:
        rows = session.execute(
            select(FineTuningJob.id, FineTuningJob.created_at, func.min(JobClaim.claimed_at),
                   func.max(JobClaim.released_at))
            .join(JobClaim, JobClaim.job_id == FineTuningJob.id)
            .where(FineTuningJob.id.in_(job_ids))
            .group_by(FineTuningJob.id, FineTuningJob.created_at)).all()
    start = min(row[2] for row in rows)
    out = {}
    for job_id, created, claimed, released in rows:
        assert claimed is not None and released is not None, job_id
        out[job_id] = ((claimed - created).total_seconds(), (claimed - start).total_seconds(),
                       (released - start).total_seconds())
    return out


def all_finished(http_by_job: dict[str, httpx.Client]) -> bool:
    from sqlalchemy import func, select

    from db.models import FineTuningJob
    from db.session import transaction

    with transaction() as session:
        statuses = dict(session.execute(
            select(FineTuningJob.status, func.count()).where(FineTuningJob.id.in_(list(http_by_job)))
            .group_by(FineTuningJob.status)).all())
    broken = {s: n for s, n in statuses.items() if s in ("failed", "cancelled")}
    if broken:
        raise RuntimeError(f"bench jobs ended badly: {broken}")
    return statuses.get("succeeded", 0) == len(http_by_job)


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-int(q * len(ordered)) // 100) - 1)] if ordered else float("nan")


def run_workload(base: str, heavy: dict[str, str], light: dict[str, str], counts: tuple[int, int]) -> dict[str, Any]:
    with httpx.Client(base_url=base, headers=heavy, timeout=60) as h, \
            httpx.Client(base_url=base, headers=light, timeout=60) as lt:
        heavy_ids = submit(h, upload(h), counts[0])
        light_ids = submit(lt, upload(lt), counts[1])
        by_job = {**{j: h for j in heavy_ids}, **{j: lt for j in light_ids}}
        wait_until(lambda: all_finished(by_job), 60 * 60, "every bench job to succeed", 1.0)
    measured = timings(heavy_ids + light_ids)
    # One job's turn on the worker: the run's span over its jobs, so the gaps between jobs (a fresh pool
    # process per job) count as they do in the waits.
    job_length = max(released for _, _, released in measured.values()) / len(measured)
    result: dict[str, Any] = {"job_length_s": round(job_length, 2)}
    for tenant, ids in (("heavy", heavy_ids), ("light", light_ids)):
        waits = [measured[j][0] for j in ids]
        result[tenant] = {"jobs": len(ids), "p50_s": round(p(waits, 50), 2), "p95_s": round(p(waits, 95), 2),
                          "p95_in_job_lengths": round(p(waits, 95) / job_length, 2)}
    return result


COMPLETION = {"model": "tiny-gpt2", "prompt": "the weather today is", "max_tokens": 8, "temperature": 0}
# The same greedy request each time: it must reach the model, not the response cache.
NO_CACHE = {"Cache-Control": "no-cache"}
LIGHT_REQUESTS = 40


def light_latencies(base: str, headers: dict[str, str]) -> list[float]:
    """One caller's requests, one at a time: the latency of each."""
    out = []
    with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
        for _ in range(LIGHT_REQUESTS):
            started = time.perf_counter()
            response = http.post("/v1/completions", json=COMPLETION, headers=NO_CACHE)
            if response.status_code != 200:
                raise RuntimeError(f"completion answered {response.status_code}: {response.text}")
            out.append(time.perf_counter() - started)
    return out


def beside_flood(base: str, flood: dict[str, str], light: dict[str, str], callers: int) -> tuple[list[float], int]:
    """The light caller's latencies while ``callers`` threads of the flooding tenant keep the worker busy;
    and how many flood requests were answered meanwhile."""
    stop = threading.Event()
    answered = [0] * callers

    def flood_caller(index: int) -> None:
        with httpx.Client(base_url=base, headers=flood, timeout=120) as http:
            while not stop.is_set():
                if http.post("/v1/completions", json=COMPLETION, headers=NO_CACHE).status_code == 200:
                    answered[index] += 1

    threads = [threading.Thread(target=flood_caller, args=(i,), daemon=True) for i in range(callers)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: sum(answered) >= callers, 120, "the flood to be answered")  # in full swing
        return light_latencies(base, light), sum(answered)
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)


def restart_scheduling_workers(stack: Any, scheduler: str) -> None:
    """The training and cpu workers again, with ``scheduler`` deciding admission to training and validation."""
    from ops.stack import argv

    stack.stop("worker-gpu", "worker-cpu")
    stack.env["LLMOS_SCHEDULER"] = scheduler
    for role in ("worker-gpu", "worker-cpu"):
        stack.start(role, argv(role))
    wait_until(workers_ready, 120, "the restarted workers", 0.5)


def measure_waits(stack: Any, args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for scheduler in ("fifo", "fair"):
        restart_scheduling_workers(stack, scheduler)
        # Fresh tenants per run: nothing of the other run's history (last start) counts.
        heavy = create_tenant(f"heavy-{scheduler}")
        light = create_tenant(f"light-{scheduler}")
        started = time.perf_counter()
        results[scheduler] = run_workload(stack.api_url, heavy, light, (args.heavy, args.light))
        print(f"{scheduler}: {args.heavy + args.light} jobs in {time.perf_counter() - started:.0f}s")
    return results


def print_waits(results: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(f"Waits from submit to running: {args.heavy} heavy-tenant jobs, then {args.light} light-tenant jobs, "
          f"one training worker ({ROWS} rows, {json.dumps(HYPERPARAMETERS)})")
    rows = [["scheduler", "tenant", "p50 s", "p95 s", "p95 / job length", "job length s"]]
    for scheduler, result in results.items():
        for tenant in ("heavy", "light"):
            rows.append([scheduler, tenant, f"{result[tenant]['p50_s']:.1f}", f"{result[tenant]['p95_s']:.1f}",
                         f"{result[tenant]['p95_in_job_lengths']:.1f}", f"{result['job_length_s']:.1f}"])
    print(table(rows))
    bound = 1 + args.light
    light_fair = results["fair"]["light"]["p95_in_job_lengths"]
    print(f"target: light p95 <= one running job + its own queue = {bound} job lengths; fair gives {light_fair}")


def measure_inference(stack: Any, args: argparse.Namespace) -> dict[str, list[float]]:
    flood = create_tenant("flood", rpm=0, tpm=0)
    calm = create_tenant("calm", rpm=0, tpm=0)
    light_latencies(stack.api_url, calm)  # the model warm in the worker
    inference = {"alone": light_latencies(stack.api_url, calm)}
    inference["own_lane"], _ = beside_flood(stack.api_url, flood, calm, args.flood)
    inference["same_lane"], _ = beside_flood(stack.api_url, flood, flood, args.flood)
    return inference


def print_inference(inference: dict[str, list[float]], args: argparse.Namespace) -> None:
    print()
    print(f"Inference: a caller's completions ({LIGHT_REQUESTS} one at a time, tiny-gpt2, 8 tokens) beside "
          f"{args.flood} concurrent callers of another tenant")
    rows = [["light caller", "p50 ms", "p95 ms", "p95 vs alone"]]
    alone_p95 = p(inference["alone"], 95)
    labels = {"alone": "alone", "own_lane": "beside the flood, own tenant (fair)",
              "same_lane": "beside the flood, flood's key (FIFO)"}
    for name, values in inference.items():
        rows.append([labels[name], f"{p(values, 50) * 1000:.0f}", f"{p(values, 95) * 1000:.0f}",
                     f"{p(values, 95) / alone_p95:.1f}x"])
    print(table(rows))


def measure_limiter(stack: Any, args: argparse.Namespace) -> dict[str, list[float]]:
    # The workers stopped, so training takes no CPU from the API.
    stack.stop("worker-gpu", "worker-cpu", "worker-inference")
    limited = create_tenant("limited", rpm=1_000_000_000)
    unlimited = create_tenant("unlimited", rpm=0)
    with httpx.Client(base_url=stack.api_url, headers=limited, timeout=60) as http:
        job_id = submit(http, upload(http), 1)[0]
    with httpx.Client(base_url=stack.api_url, headers=unlimited, timeout=60) as http:
        other_id = submit(http, upload(http), 1)[0]
    out: dict[str, list[float]] = {"without_limits": [], "with_limits": []}
    for _ in range(ROUNDS):
        out["without_limits"].append(measure(stack.api_url, unlimited, "GET",
                                             lambda _: f"/v1/fine_tuning/jobs/{other_id}", None, args.requests,
                                             args.concurrency).rps)
        out["with_limits"].append(measure(stack.api_url, limited, "GET",
                                          lambda _: f"/v1/fine_tuning/jobs/{job_id}", None, args.requests,
                                          args.concurrency).rps)
    return out


def print_limiter(rps: dict[str, list[float]], args: argparse.Namespace) -> float:
    without, with_limits = rps["without_limits"], rps["with_limits"]
    ratio = statistics.median(with_limits) / statistics.median(without)
    print()
    print(f"GET /v1/fine_tuning/jobs/{{id}} at concurrency {args.concurrency}, {args.requests} requests, "
          f"{ROUNDS} rounds alternated (median req/s)")
    print(table([["tenant", "req/s", "each round"],
                 ["without limits (rpm 0)", f"{statistics.median(without):.0f}",
                  " ".join(f"{x:.0f}" for x in without)],
                 ["with limits (Redis check)", f"{statistics.median(with_limits):.0f}",
                  " ".join(f"{x:.0f}" for x in with_limits)]]))
    print(f"limits cost: {(1 - ratio) * 100:.1f}% of GET throughput (target <= 10%)")
    return ratio


PHASES = ("waits", "inference", "limits")


def run(args: argparse.Namespace, work: Path) -> None:
    facts = machine_facts()
    command = shlex.join(["python", *sys.argv])
    print(f"command: {command}")
    print(f"machine: {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable) {facts['cpu_model']}; "
          f"CPU idle before start: {percent(facts['cpu_idle_before'])}")
    failure_logs: list[Child] = []
    report: dict[str, Any] = {"command": command, "machine": facts}
    with contextlib.ExitStack() as exits:
        try:
            stack = bring_up(exits, work, failure_logs)
            print(f"services: {stack.mode}")
            if "waits" in args.phases:
                report["waits"] = measure_waits(stack, args)
            if "inference" in args.phases:
                inference = measure_inference(stack, args)
                report["inference_ms"] = {name: {"p50": round(p(v, 50) * 1000, 1),
                                                 "p95": round(p(v, 95) * 1000, 1)} for name, v in inference.items()}
            if "limits" in args.phases:
                rps = measure_limiter(stack, args)
        except Exception:
            for child in failure_logs:
                print(f"--- last lines of {child.name} ({child.log_path}) ---\n{child.tail()}", file=sys.stderr)
            raise
    if "waits" in args.phases:
        print_waits(report["waits"], args)
    if "inference" in args.phases:
        print_inference(inference, args)
    if "limits" in args.phases:
        ratio = print_limiter(rps, args)
        report["get_rps"] = {**{k: [round(x, 1) for x in v] for k, v in rps.items()}, "ratio": round(ratio, 3)}
    print(json.dumps(report))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--heavy", type=int, default=50, help="jobs of the heavy tenant (50)")
    parser.add_argument("--light", type=int, default=5, help="jobs of the light tenant (5)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated, of {', '.join(PHASES)} (all)")
    parser.add_argument("--flood", type=int, default=32, help="concurrent callers of the flooding tenant (32)")
    parser.add_argument("--requests", type=int, default=3000, help="GETs per throughput round (3000)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (32)")
    args = parser.parse_args(argv)
    args.phases = [phase.strip() for phase in args.phases.split(",") if phase.strip()]
    if not set(args.phases) <= set(PHASES):
        parser.error(f"--phases: choose from {', '.join(PHASES)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with scratch_dir() as work:
        run(args, work)


if __name__ == "__main__":
    main()
