"""Benchmark: fair training admission between tenants, and what rate limits cost a request.

Two measurements on this machine with real processes (the API and Celery workers as `llmos up` runs them,
one training worker), printed as tables and one JSON line at the end:

1. Waits: a heavy tenant submits `--heavy` jobs (50), then a light tenant submits `--light` (5). The same
   workload runs twice, with the scheduler switched to `fifo` (the training worker restarted with
   LLMOS_SCHEDULER=fifo) and to `fair`; for each tenant, p50/p95 of the wait from submit to running
   (the job's creation to its first claim, from Postgres' own timestamps), in seconds and in job lengths
   (the median time one job held the worker). Target: the light tenant's p95 is at most one running job
   plus its own queue.
2. The limiter's cost: `GET /v1/fine_tuning/jobs/{id}` throughput for a tenant with rate limits (one Redis
   round trip per request) against one without (rpm 0), alternated in the same run.

Usage:
    python bench/fairness.py [--heavy 50] [--light 5] [--requests 3000] [--concurrency 32]

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
ROUNDS = 3


def create_tenant(name: str, **limits: Any) -> dict[str, str]:
    from db.session import transaction
    from domain import tenants
    from ops.bootstrap import create_key

    key = create_key(name, ["files", "fine_tuning"])[1]
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


def timings(job_ids: list[str]) -> dict[str, tuple[float, float]]:
    """Per job: seconds from creation to its first claim, and how long that claim held the worker."""
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
    out = {}
    for job_id, created, claimed, released in rows:
        assert claimed is not None and released is not None, job_id
        out[job_id] = ((claimed - created).total_seconds(), (released - claimed).total_seconds())
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
    job_length = statistics.median(held for _, held in measured.values())
    result: dict[str, Any] = {"job_length_s": round(job_length, 2)}
    for tenant, ids in (("heavy", heavy_ids), ("light", light_ids)):
        waits = [measured[j][0] for j in ids]
        result[tenant] = {"jobs": len(ids), "p50_s": round(p(waits, 50), 2), "p95_s": round(p(waits, 95), 2),
                          "p95_in_job_lengths": round(p(waits, 95) / job_length, 2)}
    return result


def restart_training_worker(stack: Any, scheduler: str) -> None:
    from ops.stack import argv

    stack.stop("worker-gpu")
    stack.env["LLMOS_SCHEDULER"] = scheduler
    stack.start("worker-gpu", argv("worker-gpu"))
    wait_until(workers_ready, 120, "the restarted training worker", 0.5)


def run(args: argparse.Namespace, work: Path) -> None:
    facts = machine_facts()
    command = shlex.join(["python", *sys.argv])
    print(f"command: {command}")
    print(f"machine: {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable) {facts['cpu_model']}; "
          f"CPU idle before start: {percent(facts['cpu_idle_before'])}")
    failure_logs: list[Child] = []
    with contextlib.ExitStack() as exits:
        try:
            stack = bring_up(exits, work, failure_logs)
            print(f"services: {stack.mode}")
            results = {}
            for scheduler in ("fifo", "fair"):
                restart_training_worker(stack, scheduler)
                # Fresh tenants per run: nothing of the other run's history (last start) counts.
                heavy = create_tenant(f"heavy-{scheduler}")
                light = create_tenant(f"light-{scheduler}")
                started = time.perf_counter()
                results[scheduler] = run_workload(stack.api_url, heavy, light, (args.heavy, args.light))
                print(f"{scheduler}: {args.heavy + args.light} jobs in {time.perf_counter() - started:.0f}s")

            # The limiter's cost, with the workers stopped so training takes no CPU.
            stack.stop("worker-gpu", "worker-cpu", "worker-inference")
            limited = create_tenant("limited", rpm=1_000_000_000)
            unlimited = create_tenant("unlimited", rpm=0)
            with httpx.Client(base_url=stack.api_url, headers=limited, timeout=60) as http:
                job_id = submit(http, upload(http), 1)[0]
            with httpx.Client(base_url=stack.api_url, headers=unlimited, timeout=60) as http:
                other_id = submit(http, upload(http), 1)[0]
            with_limits, without = [], []
            for _ in range(ROUNDS):
                without.append(measure(stack.api_url, unlimited, "GET",
                                       lambda _: f"/v1/fine_tuning/jobs/{other_id}", None, args.requests,
                                       args.concurrency).rps)
                with_limits.append(measure(stack.api_url, limited, "GET",
                                           lambda _: f"/v1/fine_tuning/jobs/{job_id}", None, args.requests,
                                           args.concurrency).rps)
        except Exception:
            for child in failure_logs:
                print(f"--- last lines of {child.name} ({child.log_path}) ---\n{child.tail()}", file=sys.stderr)
            raise

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
    print(json.dumps({"command": command, "machine": facts, "waits": results,
                      "get_rps": {"without_limits": [round(x, 1) for x in without],
                                  "with_limits": [round(x, 1) for x in with_limits],
                                  "ratio": round(ratio, 3)}}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--heavy", type=int, default=50, help="jobs of the heavy tenant (50)")
    parser.add_argument("--light", type=int, default=5, help="jobs of the light tenant (5)")
    parser.add_argument("--requests", type=int, default=3000, help="GETs per throughput round (3000)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (32)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with scratch_dir() as work:
        run(args, work)


if __name__ == "__main__":
    main()
