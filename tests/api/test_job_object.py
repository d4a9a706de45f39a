"""OpenAI's job fields that move with the job: `estimated_finish` is set while it runs, from its pace, and
null otherwise."""

from __future__ import annotations

import time

from tests.conftest import Api, wait_until
from tests.data import jsonl, sentiment_rows


def test_estimated_finish_is_set_while_running_and_null_otherwise(api: Api) -> None:
    file_id = api.upload(jsonl(sentiment_rows(200))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "hyperparameters": {"n_epochs": 30, "batch_size": 4}}).json()
    assert job["estimated_finish"] is None
    running = wait_until(lambda: (j := api.job(job["id"]))["estimated_finish"] and j, 120, "an estimate")
    assert running["status"] == "running"
    progress = running["progress"]
    assert 0 < progress["step"] < progress["total_steps"]
    # Far from done: the estimate lies ahead, and not before the steps left could run at the pace so far.
    assert running["estimated_finish"] > time.time()
    assert api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/pause").status_code == 200
    paused = api.wait_status(job["id"], {"paused"})
    assert paused["estimated_finish"] is None
    assert api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    assert api.wait_status(job["id"], {"cancelled"})["estimated_finish"] is None
