"""A checkpoint is a model: `ft:…:ckpt-step-N` serves and is a base for new jobs, for its tenant only, outlives
the deletion of the job's model, and goes when the trainer prunes it or when it ages out."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Api, wait_until
from tests.data import jsonl, sentiment_rows


def _checkpoints(api: Api, job_id: str) -> list[dict[str, Any]]:
    """The job's checkpoints, oldest first."""
    data: list[dict[str, Any]] = api.http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    return sorted(data, key=lambda c: c["step_number"])


def _classify(api: Api, model: str) -> httpx.Response:
    return api.http.post("/v1/classifications", json={"model": model,
                                                     "input": ["the food was wonderful", "the room was awful"]})


def test_a_checkpoint_serves_continues_training_and_outlives_its_jobs_model(
        api: Api, api_url: str, make_key: Callable[..., str]) -> None:
    file_id = api.upload(jsonl(sentiment_rows(64))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id,
        "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 50}}).json()
    done = api.wait_status(job["id"], {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done
    checkpoints = _checkpoints(api, job["id"])
    assert len(checkpoints) == 3, checkpoints  # one per epoch
    first, latest = checkpoints[0]["fine_tuned_model_checkpoint"], checkpoints[-1]["fine_tuned_model_checkpoint"]
    assert latest == f"{done['fine_tuned_model']}:ckpt-step-{checkpoints[-1]['step_number']}"

    answer = _classify(api, latest)
    assert answer.status_code == 200, answer.text
    assert {d["label"] for d in answer.json()["data"]} <= {"pos", "neg"}
    model = api.http.get(f"/v1/models/{latest}").json()
    assert model["kind"] == "checkpoint" and model["owned_by"] == done["organization_id"], model
    # Listed with its job, not among the models.
    assert latest not in {m["id"] for m in api.http.get("/v1/models").json()["data"]}
    # The trainer keeps the newest two on disk: the first is no longer a model.
    pruned = _classify(api, first)
    assert pruned.status_code == 400 and pruned.json()["error"]["code"] == "model_not_found", pruned.text

    # Another tenant sees none of it.
    stranger = Api(api_url, make_key("someone-else"))
    refused = _classify(stranger, latest)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_found", refused.text
    assert stranger.http.post("/v1/fine_tuning/jobs", json={"model": latest, "training_file": file_id}
                              ).status_code in (400, 404)

    # Deleting the job's model leaves its checkpoints.
    assert api.http.delete(f"/v1/models/{done['fine_tuned_model']}").json()["deleted"] is True
    assert _classify(api, latest).status_code == 200

    # A checkpoint is a base: training continues from it, and the new model names the root base.
    more = api.http.post("/v1/fine_tuning/jobs", json={
        "model": latest, "training_file": file_id, "hyperparameters": {"n_epochs": 1}}).json()
    continued = api.wait_status(more["id"], {"succeeded", "failed", "cancelled"})
    assert continued["status"] == "succeeded", continued
    assert continued["model"] == latest and continued["fine_tuned_model"].startswith("ft:tiny-bert:")
    assert _classify(api, continued["fine_tuned_model"]).status_code == 200


def test_checkpoints_age_out_after_the_retention_period(api: Api) -> None:
    from core.clock import utcnow
    from core.settings import get_settings
    from db.models import Checkpoint, FineTuningJob
    from db.session import transaction
    from tasks.maintenance import purge

    file_id = api.upload(jsonl(sentiment_rows(24))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "hyperparameters": {"n_epochs": 1}}).json()
    assert api.wait_status(job["id"], {"succeeded", "failed"})["status"] == "succeeded"
    checkpoint = _checkpoints(api, job["id"])[-1]["fine_tuned_model_checkpoint"]
    assert _classify(api, checkpoint).status_code == 200
    with transaction() as session:
        row = session.get(FineTuningJob, job["id"])
        assert row is not None and row.finished_at is not None
        kept_days = get_settings().checkpoint_retention_days
        purge()  # a job that just finished keeps its checkpoints
        row.finished_at = utcnow() - timedelta(days=kept_days + 1)
        stored = [Path(c.path) for c in session.query(Checkpoint).filter_by(job_id=job["id"])]
    assert _classify(api, checkpoint).status_code == 200
    assert purge()["checkpoints"] == 1  # the beat task's function, called directly for a deterministic pass
    gone = _classify(api, checkpoint)
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "model_not_found", gone.text
    wait_until(lambda: not any(p.exists() for p in stored), 5, "the checkpoint's files to be deleted")


def test_a_lora_generation_checkpoint_completes_text(api: Api) -> None:
    from tests.data import color_rows

    file_id = api.upload(jsonl(color_rows(4))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-gpt2", "training_file": file_id,
        "hyperparameters": {"n_epochs": 2, "batch_size": 4, "lora": True}}).json()
    done = api.wait_status(job["id"], {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done
    checkpoint = _checkpoints(api, job["id"])[0]["fine_tuned_model_checkpoint"]
    answer = api.http.post("/v1/completions", json={"model": checkpoint, "prompt": "The sky is", "max_tokens": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == checkpoint and answer.json()["usage"]["completion_tokens"] > 0
