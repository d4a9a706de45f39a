"""`compute.processes`: a job trains as N data-parallel processes on a worker that offers as many, a wider
job waits with an event saying why (without holding up narrower jobs), and a killed rank fails over like a
lost worker, resuming from the last checkpoint."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from tests.conftest import Api, Process, wait_until
from tests.data import jsonl, sentiment_rows


@pytest.fixture(scope="module")
def wide_worker(stack: dict[str, Process], services: dict[str, str]) -> Iterator[Process]:
    """A second training worker, offering two processes (the session's offers one: this machine has no GPU)."""
    from ops import stack as deployment

    env = {**{k: v for k, v in services.items() if k.startswith("LLMOS_")}, "LLMOS_WORKER_PROCESSES": "2"}
    worker = Process("worker-gpu-wide", deployment.argv("worker-gpu"), env, Path(services["home"]) / "logs")
    _wait_advertised(worker, 90)
    yield worker
    worker.stop()


def _wait_advertised(worker: Process, timeout: float = 10) -> None:
    """Until the wide worker's offer is in Postgres (each test starts from emptied tables; it writes it again
    at its next heartbeat)."""
    from db.models import TrainingWorker
    from db.session import transaction

    def advertised() -> bool:
        if worker.popen.poll() is not None:
            raise AssertionError(f"the wide worker exited:\n{worker.tail()}")
        with transaction() as session:
            return session.scalar(select(TrainingWorker.processes).where(TrainingWorker.processes == 2)) == 2

    wait_until(advertised, timeout, "the wide worker to advertise two processes")


def _rank_pids(worker: Process) -> list[int]:
    """The training ranks under a worker: processes started the way multiprocessing's spawn starts them."""
    found = []
    for child in psutil.Process(worker.popen.pid).children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "spawn_main" in cmdline:
            found.append(child.pid)
    return found


def test_a_two_process_job_trains_on_the_worker_that_offers_two(api: Api, wide_worker: Process) -> None:
    _wait_advertised(wide_worker)
    file_id = api.upload(jsonl(sentiment_rows(48))).json()["id"]
    created = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "compute": {"processes": 2},
        "hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 50}})
    assert created.status_code == 200, created.text
    assert created.json()["compute"] == {"processes": 2}
    job = api.wait_status(created.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert job["status"] == "succeeded", (job, wide_worker.tail())
    messages = api.messages(job["id"])
    assert "Training with 2 processes" in messages, messages
    assert not any(m.startswith("Waiting for a training worker") for m in messages), messages
    # Every rank's tokens count: two epochs over the training share of 48 rows, all of them real tokens.
    assert job["trained_tokens"] and job["trained_tokens"] > 0
    assert job["metrics"] and 0.0 <= job["metrics"]["accuracy"] <= 1.0
    # Rank 0 wrote the events: each step's metrics once, not once per rank.
    steps = [e["data"]["step"] for e in api.events(job["id"])
             if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert steps and len(steps) == len(set(steps)), steps
    # The ranks ended with the job.
    wait_until(lambda: not _rank_pids(wide_worker), 30, "the ranks to exit")
    model = job["fine_tuned_model"]
    answer = api.http.post("/v1/classifications", json={"model": model, "input": "the film was wonderful"})
    assert answer.status_code == 200, answer.text


def test_a_job_wider_than_every_worker_waits_saying_why_and_narrow_jobs_pass_it(
        api: Api, wide_worker: Process) -> None:
    _wait_advertised(wide_worker)
    file_id = api.upload(jsonl(sentiment_rows(24))).json()["id"]
    wide = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "compute": {"processes": 3}}).json()
    waiting = wait_until(lambda: [m for m in api.messages(wide["id"]) if m.startswith("Waiting for a training worker")],
                         60, "the event naming what the job waits for")
    assert "runs 3 processes" in waiting[0] and "offers 2" in waiting[0], waiting
    narrow = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "hyperparameters": {"n_epochs": 1}}).json()
    assert api.wait_status(narrow["id"], {"succeeded", "failed"})["status"] == "succeeded"
    still = api.job(wide["id"])
    assert still["status"] == "queued" and still["attempts"] == 0 and still["queue_position"] == 1, still
    assert api.http.post(f"/v1/fine_tuning/jobs/{wide['id']}/cancel").json()["status"] == "cancelled"


def test_a_killed_rank_fails_over_like_a_lost_worker(api: Api, wide_worker: Process) -> None:
    from db.models import JobClaim
    from db.session import transaction

    _wait_advertised(wide_worker)
    file_id = api.upload(jsonl(sentiment_rows(200))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "compute": {"processes": 2},
        "hyperparameters": {"n_epochs": 30, "batch_size": 4}}).json()
    wait_until(lambda: api.http.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"], 180,
               "the first checkpoint")
    ranks = wait_until(lambda: _rank_pids(wide_worker) if len(_rank_pids(wide_worker)) == 2 else None, 30,
                       "both ranks")
    os.kill(ranks[-1], signal.SIGKILL)

    requeued = wait_until(lambda: [m for m in api.messages(job["id"]) if "requeued" in m], 60, "the requeue")
    assert re.search(r"Training rank \d of 2 was killed by SIGKILL", requeued[0]), requeued
    resumed = wait_until(lambda: [m for m in api.messages(job["id"]) if m.startswith("resumed from checkpoint")],
                         180, "the second attempt to resume")
    resumed_step = int(re.findall(r"\d+", resumed[-1])[-1])
    assert resumed_step > 0
    wait_until(lambda: (api.job(job["id"]).get("progress") or {}).get("step", 0) > resumed_step, 120,
               "the second attempt to train on")
    assert api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    assert api.wait_status(job["id"], {"cancelled", "failed", "succeeded"})["status"] == "cancelled"
    with transaction() as session:
        claims = session.scalars(select(JobClaim).where(JobClaim.job_id == job["id"]).order_by(JobClaim.attempt)).all()
    assert [(c.attempt, c.outcome) for c in claims] == [(1, "lost"), (2, "cancel")]
    wait_until(lambda: not _rank_pids(wide_worker), 30, "the ranks to exit")
