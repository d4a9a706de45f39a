"""A worker stopped with SIGTERM checkpoints, hands its job back, and the next worker resumes it."""

from __future__ import annotations

import re

from tests.conftest import Api, Process, wait_until
from tests.data import jsonl, sentiment_rows


def test_sigterm_checkpoints_and_the_next_worker_resumes(api: Api, stack: dict[str, Process]) -> None:
    file_id = api.upload(jsonl(sentiment_rows(400))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id,
        "hyperparameters": {"n_epochs": 50, "batch_size": 2}}).json()
    wait_until(lambda: (api.job(job["id"]).get("progress") or {}).get("step", 0) >= 20, 120,
               "training to pass step 20")

    stack["worker-gpu"].stop()  # SIGTERM to the worker's process group, as `llmos up` or a deploy does
    handed_back = api.wait_status(job["id"], {"queued", "failed", "succeeded"}, timeout=30)
    assert handed_back["status"] == "queued", handed_back
    requeued = [m for m in api.messages(job["id"]) if m.startswith("Worker shutting down; requeued at step")]
    assert requeued, api.messages(job["id"])
    step = int(re.findall(r"\d+", requeued[-1])[-1])
    assert step >= 20

    stack["worker-gpu"] = stack["worker-gpu"].respawn("worker-gpu-2")
    wait_until(lambda: api.job(job["id"])["attempts"] == 2 and api.job(job["id"])["status"] == "running", 120,
               "the new worker to claim the job")
    wait_until(lambda: f"resumed from checkpoint at step {step}" in api.messages(job["id"]), 60,
               "the resume event")
    wait_until(lambda: (api.job(job["id"]).get("progress") or {}).get("step", 0) > step, 60,
               "the step counter to continue past the checkpoint")
    assert api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    final = api.wait_status(job["id"], {"cancelled", "failed", "succeeded"})
    assert final["status"] == "cancelled" and final["attempts"] == 2


def test_sigterms_after_the_first_do_not_kill_the_hand_back(api: Api, stack: dict[str, Process]) -> None:
    """SIGTERM after SIGTERM to the training process (a supervisor and the worker's own shutdown both
    signalling): the first asks for a checkpoint, and the rest, landing while the hand-back is written,
    must not kill the process before it is. Otherwise the job sits `running` under a dead process until
    the reconciler writes the attempt off as lost."""
    import os
    import signal
    import time

    import psutil

    file_id = api.upload(jsonl(sentiment_rows(400))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id,
        "hyperparameters": {"n_epochs": 50, "batch_size": 2}}).json()
    wait_until(lambda: (api.job(job["id"]).get("progress") or {}).get("step", 0) >= 10, 120, "training to start")
    trainer = psutil.Process(stack["worker-gpu"].popen.pid).children()[0]

    def handed_back() -> bool:
        return any(m.startswith("Worker shutting down; requeued at step") for m in api.messages(job["id"]))

    deadline = time.monotonic() + 30
    # Signals every few milliseconds until the hand-back is recorded or the process is gone.
    while trainer.is_running() and not handed_back() and time.monotonic() < deadline:
        try:
            os.kill(trainer.pid, signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.005)  # the signals' spacing, not a wait for anything
    wait_until(handed_back, 20, "the hand-back to be recorded")
    messages = api.messages(job["id"])
    assert not any("stopped responding" in m for m in messages), messages
    assert api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    assert api.wait_status(job["id"], {"cancelled", "failed", "succeeded"})["status"] == "cancelled"


def test_pause_checkpoints_frees_the_worker_and_resume_continues(api: Api) -> None:
    file_id = api.upload(jsonl(sentiment_rows(400))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id,
        "hyperparameters": {"n_epochs": 50, "batch_size": 2}}).json()
    wait_until(lambda: (api.job(job["id"]).get("progress") or {}).get("step", 0) >= 10, 120, "training to start")
    assert api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/pause").status_code == 200
    paused = api.wait_status(job["id"], {"paused", "failed", "succeeded"}, timeout=60)
    assert paused["status"] == "paused"
    step = int(re.findall(r"\d+", [m for m in api.messages(job["id"]) if m.startswith("Job paused at step")][-1])[-1])
    checkpoints = api.http.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert checkpoints[0]["step_number"] == step

    # The worker is free: another job runs to completion while this one is paused.
    other_file = api.upload(jsonl(sentiment_rows(20))).json()["id"]
    other = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": other_file,
                                                        "hyperparameters": {"n_epochs": 1}}).json()
    assert api.wait_status(other["id"], {"succeeded", "failed"})["status"] == "succeeded"
    assert api.job(job["id"])["status"] == "paused"

    resumed = api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    wait_until(lambda: f"resumed from checkpoint at step {step}" in api.messages(job["id"]), 120, "the resume event")
    wait_until(lambda: (api.job(job["id"]).get("progress") or {}).get("step", 0) > step, 60, "progress past the pause")
    assert api.job(job["id"])["attempts"] == 2
    assert api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    assert api.wait_status(job["id"], {"cancelled", "failed", "succeeded"})["status"] == "cancelled"
    assert api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").status_code == 409


def test_a_job_past_its_max_runtime_checkpoints_and_fails(api: Api) -> None:
    file_id = api.upload(jsonl(sentiment_rows(400))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id,
        "hyperparameters": {"n_epochs": 50, "batch_size": 2, "max_runtime_seconds": 3}}).json()
    assert job["hyperparameters"]["max_runtime_seconds"] == 3
    final = api.wait_status(job["id"], {"failed", "succeeded", "cancelled"}, timeout=120)
    assert final["status"] == "failed", final
    assert final["error"]["code"] == "max_runtime_exceeded"
    assert final["error"]["param"] == "hyperparameters.max_runtime_seconds"
    assert "maximum runtime of 3 s" in final["error"]["message"]
    # Soft limit first: the run stopped at a step boundary (on a busy machine possibly the first one) and
    # left a checkpoint exactly there, long before its 50 epochs were done.
    step = int(re.findall(r"at step (\d+)", final["error"]["message"])[0])
    checkpoints = api.http.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert checkpoints and checkpoints[0]["step_number"] == step
    assert step < 50 * 200


def test_max_runtime_out_of_range_is_a_400(api: Api) -> None:
    file_id = api.upload(jsonl(sentiment_rows(20))).json()["id"]
    response = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "hyperparameters": {"max_runtime_seconds": 0}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "hyperparameters.max_runtime_seconds"
