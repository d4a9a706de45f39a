"""A worker killed outright: the reconciler notices the silent heartbeat and the job resumes from its checkpoint."""

from __future__ import annotations

import os
import re
import signal
from datetime import timedelta

from sqlalchemy import select

from tests.conftest import Api, Process, wait_until
from tests.data import jsonl, sentiment_rows


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(api: Api, stack: dict[str, Process]) -> None:
    file_id = api.upload(jsonl(sentiment_rows(200))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id,
        "hyperparameters": {"n_epochs": 30, "batch_size": 4}}).json()
    wait_until(lambda: api.http.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"], 120,
               "the first checkpoint")
    checkpoint_step = api.http.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"][0]["step_number"]

    worker = stack["worker-gpu"].popen
    os.killpg(worker.pid, signal.SIGKILL)  # no warning, no checkpoint: a crash
    worker.wait(30)
    stack["worker-gpu"] = stack["worker-gpu"].respawn("worker-gpu-3")

    wait_until(lambda: api.job(job["id"])["attempts"] == 2 and api.job(job["id"])["status"] == "running", 120,
               "the reconciler to requeue the job and a new worker to claim it")
    messages = api.messages(job["id"])
    assert any("stopped responding; requeued" in m for m in messages), messages
    resumed = wait_until(lambda: [m for m in api.messages(job["id"]) if m.startswith("resumed from checkpoint")],
                         60, "the resume event")
    resumed_step = int(re.findall(r"\d+", resumed[-1])[-1])
    assert resumed_step >= checkpoint_step
    wait_until(lambda: (api.job(job["id"]).get("progress") or {}).get("step", 0) > resumed_step, 60,
               "the step counter to continue")
    assert api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    assert api.wait_status(job["id"], {"cancelled", "failed", "succeeded"})["status"] == "cancelled"

    from db.models import JobClaim
    from db.session import transaction

    with transaction() as session:
        claims = session.scalars(select(JobClaim).where(JobClaim.job_id == job["id"]).order_by(JobClaim.attempt)).all()
    assert [(c.attempt, c.outcome) for c in claims] == [(1, "lost"), (2, "cancel")]
    # Never in two places at once: the second claim began after the first was released.
    assert claims[0].released_at is not None and claims[1].claimed_at >= claims[0].released_at


def test_a_job_that_keeps_losing_its_worker_fails_at_the_attempt_cap(api: Api, services: dict[str, str]) -> None:
    from core.clock import utcnow
    from core.settings import get_settings
    from db.models import FineTuningJob, JobClaim
    from db.session import transaction
    from tasks.maintenance import reconcile

    file_id = api.upload('{"text": "", "label": "a"}\n').json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id}).json()
    api.wait_status(job["id"], {"failed"})
    cap = get_settings().max_attempts
    with transaction() as session:
        row = session.get(FineTuningJob, job["id"])
        assert row is not None
        # A job whose worker was lost on every earlier attempt, and whose current worker went silent too.
        row.status, row.attempts, row.error, row.finished_at = "running", cap, None, None
        row.heartbeat_at = utcnow() - timedelta(hours=1)
        for attempt in range(1, cap + 1):
            session.add(JobClaim(job_id=row.id, attempt=attempt, worker="gone", claimed_at=utcnow(),
                                 released_at=utcnow() if attempt < cap else None,
                                 outcome="lost" if attempt < cap else None))
    reconcile()  # the beat task's function, called directly for a deterministic pass
    final = api.job(job["id"])
    assert final["status"] == "failed" and final["error"]["code"] == "worker_lost"
    assert str(cap) in final["error"]["message"]
