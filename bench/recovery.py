"""Benchmark: how fast a training job is running again after its worker dies, and how many steps it loses.

Real processes as `llmos up` runs them: the API, a worker per queue and beat, with the gpu worker and beat
under `ops.supervisor.Supervisor` (the supervisor of `llmos up`, restarting a child 1 s after it exits).
Each run starts a tiny-bert classification job (1,000 rows, batch 4: 225 steps an epoch, a checkpoint at each
epoch end), lets it pass its first checkpoint plus a seeded random part of the next epoch, then:

- SIGKILL of the gpu worker's process group (a crash): the time to the job reading `queued` again (the
  reconciler noticing the silent heartbeat) and to `running` with attempts + 1 on the restarted worker, and
  the steps lost: the last progress step recorded before the kill minus the step the job resumed from.
  Progress rows are written at most once a second, so the true loss is higher by up to a second of steps.
- SIGTERM of the same group (a deploy, `kill`): the time to the job handed back (`queued`, checkpointed at
  the step it stopped), to `running` again on the restarted worker, and the steps lost (expected 0).

The SIGKILL recovery is bounded by LLMOS_STALE_HEARTBEAT_SECONDS (a job silent this long is requeued) plus
up to one LLMOS_RECONCILE_SECONDS period (the reconciler's tick); each run prints the two parts separately.
Settings are the real defaults unless given as options, which set the LLMOS_* variables of every process.

Usage:
    python bench/recovery.py [--runs 3] [--kind sigkill sigterm] [--seed 0]
                             [--stale-heartbeat-seconds S] [--reconcile-seconds S] [--heartbeat-seconds S]

With LLMOS_DATABASE_URL / LLMOS_BROKER_URL set it uses those servers (a fresh database, dropped at the end;
the broker's job queues purged); otherwise it starts embedded Postgres and Redis in a temp dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):
    # Run as a script, sys.path starts at bench/; the project and bench.lifecycle live at the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lifecycle import (
    Child,
    bring_up,
    cpu_idle_share,
    machine_facts,
    percent,
    scratch_dir,
    table,
    wait_until,
    workers_ready,
)

TRAIN_ROWS = 1000
HYPERPARAMETERS: dict[str, Any] = {"n_epochs": 20, "batch_size": 4, "learning_rate": 1e-3}
STEPS_PER_EPOCH = 225  # 1,000 rows less the tenth held out for evaluation, 4 to a batch
# Kill points are drawn from the first 70% of an epoch: polling (and progress rows, written at most once a
# second) lag the loop by tens of steps, and a signal meant for mid-epoch must not land past its end.
KILL_SPAN = 0.7
POLL_INTERVAL = 0.1
# Generous: with the default settings a lost worker is noticed after 120 s plus up to a 30 s tick.
RECOVERY_TIMEOUT = 600.0
START_TIMEOUT = 300.0
CADENCE = {"stale_heartbeat_seconds": "LLMOS_STALE_HEARTBEAT_SECONDS",
           "reconcile_seconds": "LLMOS_RECONCILE_SECONDS", "heartbeat_seconds": "LLMOS_HEARTBEAT_SECONDS"}


@dataclass
class Recovery:
    kind: str
    job_id: str
    kill_step: int  # last progress step recorded before the signal
    resumed_step: int  # the checkpoint the next attempt started from
    steps_lost: int
    to_queued_s: float  # signal → the job reads queued (requeued by the reconciler, or handed back)
    to_running_s: float  # signal → the job reads running with attempts + 1
    worker_restarted_s: float  # signal → the supervisor started the new gpu worker process
    stale_wait_s: float | None  # SIGKILL: signal → last heartbeat + stale threshold (the threshold's share)
    tick_wait_s: float | None  # SIGKILL: from there → requeued (waiting for the reconciler's next tick)


class Bench:
    """The stack, the supervisor of the gpu worker and beat, and an authenticated client."""

    def __init__(self, http: httpx.Client, supervisor: Any) -> None:
        self.http = http
        self.supervisor = supervisor

    def job(self, job_id: str) -> dict[str, Any]:
        # Every poll also lets the supervisor notice exits and restart children, as `llmos up` does.
        self.supervisor.poll()
        response = self.http.get(f"/v1/fine_tuning/jobs/{job_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        if body["status"] in {"failed", "cancelled", "succeeded"}:
            raise RuntimeError(f"job {job_id} ended {body['status']} mid-measurement: {body.get('error')}")
        return body

    def messages(self, job_id: str) -> list[str]:
        """Every event message of a job, oldest first."""
        data: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self.http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
            data.extend(page["data"])
            if not page["has_more"]:
                return [e["message"] for e in reversed(data)]
            params["after"] = page["data"][-1]["id"]

    def gpu_worker_up(self) -> bool:
        self.supervisor.poll()
        return self.supervisor.pid("worker-gpu") is not None and workers_ready()


def heartbeat_at(job_id: str) -> float:
    """The job's last heartbeat, as a Unix time (read from Postgres: the API does not show it)."""
    from db import jobs as jobs_repo
    from db.session import transaction

    with transaction() as session:
        job = jobs_repo.get_job_by_id(session, job_id)
        assert job is not None and job.heartbeat_at is not None
        return job.heartbeat_at.timestamp()


def measure_once(bench: Bench, file_id: str, kind: str, rng: random.Random) -> Recovery:
    from core.settings import get_settings

    settings = get_settings()
    created = bench.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "hyperparameters": HYPERPARAMETERS})
    created.raise_for_status()
    job_id = created.json()["id"]

    def first_checkpoint() -> int | None:
        bench.supervisor.poll()
        data = bench.http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
        return int(data[0]["step_number"]) if data else None  # newest first

    checkpoint_step = wait_until(first_checkpoint, START_TIMEOUT, "the job's first checkpoint", POLL_INTERVAL)
    # A seeded random point inside the next epoch: the kill lands anywhere between two checkpoints.
    target = checkpoint_step + 1 + int(rng.random() * KILL_SPAN * STEPS_PER_EPOCH)
    wait_until(lambda: (bench.job(job_id).get("progress") or {}).get("step", 0) >= target, START_TIMEOUT,
               f"the job to reach step {target}", POLL_INTERVAL)
    pid = bench.supervisor.pid("worker-gpu")
    assert pid is not None
    restarts = bench.supervisor.restart_count("worker-gpu")
    attempts = bench.job(job_id)["attempts"]
    signalled = time.perf_counter()
    signalled_wall = time.time()
    os.killpg(pid, signal.SIGKILL if kind == "sigkill" else signal.SIGTERM)

    kill_step: int | None = None
    stale_due: float | None = None
    if kind == "sigkill":
        wait_until(lambda: gone(pid), 30, "the gpu worker to die", 0.01)
        # Dead: nothing rewrites the row until the next claim, so it holds the last step and heartbeat.
        kill_step = int(bench.job(job_id)["progress"]["step"])
        # Seconds after the signal at which the reconciler may first call the job stale.
        stale_due = heartbeat_at(job_id) + settings.stale_heartbeat_seconds - signalled_wall
    to_queued = to_running = restarted = None
    deadline = signalled + RECOVERY_TIMEOUT
    while to_running is None:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"job {job_id} not running again {RECOVERY_TIMEOUT:.0f}s after {kind}")
        job = bench.job(job_id)
        now = time.perf_counter() - signalled
        if restarted is None and bench.supervisor.restart_count("worker-gpu") > restarts:
            restarted = now
        if to_queued is None and job["status"] == "queued":
            to_queued = now
        if job["status"] == "running" and job["attempts"] == attempts + 1:
            to_running = now
            to_queued = to_queued if to_queued is not None else now  # passed through faster than a poll
        time.sleep(POLL_INTERVAL)
    assert to_queued is not None
    if restarted is None:
        restarted = to_running  # the claim needs the new worker, so it was up by then

    resumed = wait_until(lambda: [m for m in bench.messages(job_id) if m.startswith("resumed from checkpoint")],
                         60, "the resume event", POLL_INTERVAL)
    resumed_step = int(re.findall(r"\d+", resumed[-1])[-1])
    if kind == "sigterm":
        handed_back = [m for m in bench.messages(job_id) if m.startswith("Worker shutting down; requeued at step")]
        kill_step = int(re.findall(r"\d+", handed_back[-1])[-1])  # the step it stopped and checkpointed at
    assert kill_step is not None
    cancel = bench.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    cancel.raise_for_status()
    wait_until(lambda: bench.http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "cancelled", 120,
               "the job to cancel", POLL_INTERVAL)
    return Recovery(
        kind, job_id, kill_step, resumed_step, kill_step - resumed_step, round(to_queued, 2), round(to_running, 2),
        round(restarted, 2),
        None if stale_due is None else round(stale_due, 2),
        None if stale_due is None else round(to_queued - stale_due, 2),
    )


def gone(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def median(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    return f"{statistics.median(present):.1f}" if present else "-"


def report(results: list[Recovery]) -> str:
    rows = [["run", "kind", "signal->queued s", "signal->running s", "worker restarted s", "stale share s",
             "tick share s", "last step", "resumed at", "steps lost"]]
    for i, r in enumerate(results, 1):
        rows.append([str(i), r.kind, f"{r.to_queued_s:.1f}", f"{r.to_running_s:.1f}", f"{r.worker_restarted_s:.1f}",
                     "-" if r.stale_wait_s is None else f"{r.stale_wait_s:.1f}",
                     "-" if r.tick_wait_s is None else f"{r.tick_wait_s:.1f}",
                     str(r.kill_step), str(r.resumed_step), str(r.steps_lost)])
    for kind in sorted({r.kind for r in results}):
        mine = [r for r in results if r.kind == kind]
        rows.append(["median", kind, median([r.to_queued_s for r in mine]), median([r.to_running_s for r in mine]),
                     median([r.worker_restarted_s for r in mine]), median([r.stale_wait_s for r in mine]),
                     median([r.tick_wait_s for r in mine]), "", "", median([float(r.steps_lost) for r in mine])])
    return table(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="measurements of each kind (3)")
    parser.add_argument("--kind", nargs="+", choices=["sigkill", "sigterm"], default=["sigkill", "sigterm"])
    parser.add_argument("--seed", type=int, default=0, help="seeds where in an epoch each signal lands (0)")
    for name in CADENCE:
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                            help=f"sets {CADENCE[name]} for every process (default: the setting's default)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def run(args: argparse.Namespace, work: Path) -> None:
    from ops.stack import argv
    from ops.supervisor import ChildSpec, Supervisor

    for name, variable in CADENCE.items():
        if getattr(args, name) is not None:
            os.environ[variable] = str(getattr(args, name))
        else:
            os.environ.pop(variable, None)  # the real default, not one left in this shell
    facts = machine_facts()
    command = shlex.join(["python", *sys.argv])
    print(f"command: {command}")
    print(f"machine: {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable) {facts['cpu_model']}; "
          f"torch {facts['torch']}; Python {facts['python']}; {facts['platform']}")
    print(f"CPU idle before start: {percent(facts['cpu_idle_before'])}; load average {os.getloadavg()}")

    failure_logs: list[Child] = []
    results: list[Recovery] = []
    with contextlib.ExitStack() as exits:
        try:
            stack = bring_up(exits, work, failure_logs)
            from core.settings import get_settings
            from ops.bootstrap import create_key

            settings = get_settings()
            cadence = {name: getattr(settings, name) for name in CADENCE}
            print(f"services: {stack.mode}; cadence {cadence}")
            # The gpu worker and beat under the supervisor of `llmos up`, which restarts what exits.
            stack.stop("worker-gpu")
            supervisor = Supervisor(stack.log_dir)
            supervisor.add(ChildSpec("worker-gpu", argv("worker-gpu"), stack.env))
            supervisor.add(ChildSpec("beat", argv("beat"), stack.env))
            supervisor.start()
            exits.callback(supervisor.stop)
            headers = {"Authorization": f"Bearer {create_key('bench', ['files', 'fine_tuning'])[1]}"}
            with httpx.Client(base_url=stack.api_url, headers=headers, timeout=60) as http:
                bench = Bench(http, supervisor)
                wait_until(bench.gpu_worker_up, 120, "the supervised gpu worker", 0.5)
                from tests.data import jsonl, sentiment_rows

                upload = http.post("/v1/files", data={"purpose": "fine-tune"},
                                   files={"file": ("train.jsonl", jsonl(sentiment_rows(TRAIN_ROWS)).encode())})
                upload.raise_for_status()
                file_id = upload.json()["id"]
                rng = random.Random(args.seed)
                for kind in args.kind:
                    for _ in range(args.runs):
                        result = measure_once(bench, file_id, kind, rng)
                        results.append(result)
                        print(f"  {kind}: {json.dumps(asdict(result))} (load average {os.getloadavg()[0]:.2f})",
                              flush=True)
        except Exception:  # a failure, not an interrupt: show what the processes said before they go
            for child in failure_logs:
                print(f"--- last lines of {child.name} ({child.log_path}) ---\n{child.tail()}", file=sys.stderr)
            for name in ("worker-gpu", "beat"):
                path = work / "logs" / f"{name}.log"
                if path.exists():
                    tail = "\n".join(path.read_text(errors="replace").splitlines()[-40:])
                    print(f"--- last lines of {name} ({path}) ---\n{tail}", file=sys.stderr)
            raise

    idle_after = cpu_idle_share()
    print()
    print(f"Recovery of a tiny-bert job ({TRAIN_ROWS} rows, {json.dumps(HYPERPARAMETERS)}: {STEPS_PER_EPOCH} "
          f"steps an epoch, a checkpoint each epoch); cadence {cadence}")
    print(report(results))
    print(f"CPU idle after stop: {percent(idle_after)}")
    print(json.dumps({"command": command, "machine": {**facts, "cpu_idle_after": idle_after},
                      "cadence": cadence, "steps_per_checkpoint": STEPS_PER_EPOCH,
                      "runs": [asdict(r) for r in results]}))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) must unwind the finally blocks that stop servers and processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with scratch_dir() as work:
        run(args, work)


if __name__ == "__main__":
    main()
