"""A job's `mlflow` integration: hyperparameters, every logged and evaluated metric, the final metrics and the
model's files reach the run, which ends with the job; what the workers could not log to is refused at
creation, naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api, wait_until
from tests.data import jsonl, sentiment_rows


def test_a_job_logs_its_run_to_mlflow(api: Api, services: dict[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{Path(services['LLMOS_MLFLOW_LOCAL_ROOT']).resolve()}/runs.db"
    file_id = api.upload(jsonl(sentiment_rows(48))).json()["id"]
    created = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id,
        "hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 50},
        "integrations": [{"type": "mlflow", "mlflow": {"tracking_uri": uri, "experiment": "sentiment",
                                                        "tags": {"team": "nlp"}}}]})
    assert created.status_code == 200, created.text
    assert created.json()["integrations"] == [{"type": "mlflow", "mlflow": {
        "tracking_uri": uri, "experiment": "sentiment", "tags": {"team": "nlp"}}}]
    done = api.wait_status(created.json()["id"], {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done
    # The tracker logs on a thread of its own (creating the store took a while here): its run id follows.
    run_id = wait_until(lambda: api.job(done["id"])["integrations"][0]["mlflow"].get("run_id"), 60, "the run id")

    client = MlflowClient(tracking_uri=uri)
    # The run ends just after the job's outcome is recorded, once its files are sent.
    run = wait_until(lambda: (r := client.get_run(run_id)).info.status == "FINISHED" and r, 60, "the run to end")
    assert run.info.run_name == done["id"]
    assert client.get_experiment(run.info.experiment_id).name == "sentiment"
    assert run.data.tags["team"] == "nlp" and run.data.tags["llmos.job_id"] == done["id"]
    params = run.data.params
    assert params["n_epochs"] == "2" and params["batch_size"] == "8" and params["base_model"] == "tiny-bert"
    assert params["task"] == "classification"
    losses = client.get_metric_history(run_id, "train_loss")
    assert len(losses) >= 2 and [m.step for m in losses] == sorted(m.step for m in losses)
    assert len(client.get_metric_history(run_id, "eval_accuracy")) == 2  # one evaluation per epoch
    assert run.data.metrics["final/accuracy"] == pytest.approx(done["metrics"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert "model/config.json" in artifacts and "model/model.safetensors" in artifacts, artifacts


def test_a_cancelled_job_ends_its_run_killed(api: Api, services: dict[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{Path(services['LLMOS_MLFLOW_LOCAL_ROOT']).resolve()}/runs.db"
    file_id = api.upload(jsonl(sentiment_rows(200))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "hyperparameters": {"n_epochs": 30, "batch_size": 4},
        "integrations": [{"type": "mlflow", "mlflow": {"tracking_uri": uri}}]}).json()
    run_id = wait_until(lambda: api.job(job["id"])["integrations"][0]["mlflow"].get("run_id"), 120, "the run")
    wait_until(lambda: (api.job(job["id"]).get("progress") or {}).get("step", 0) > 0, 60, "training")
    assert api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    assert api.wait_status(job["id"], {"cancelled", "failed", "succeeded"})["status"] == "cancelled"
    client = MlflowClient(tracking_uri=uri)
    run = wait_until(lambda: (r := client.get_run(run_id)).info.status != "RUNNING" and r, 60, "the run to end")
    assert run.info.status == "KILLED"
    assert client.get_experiment(run.info.experiment_id).name == "llmos"
    assert not client.list_artifacts(run_id)


@pytest.mark.parametrize("mlflow, param", [
    ({"tracking_uri": "ftp://tracking.example.com"}, "integrations[0].mlflow.tracking_uri"),
    ({"tracking_uri": "sqlite:////etc/runs.db"}, "integrations[0].mlflow.tracking_uri"),
    ({"tracking_uri": "sqlite:///relative.db"}, "integrations[0].mlflow.tracking_uri"),
    ({"tracking_uri": "https://no-such-host.invalid"}, "integrations[0].mlflow.tracking_uri"),
    ({"experiment": "x"}, "integrations.0.mlflow.tracking_uri"),
])
def test_what_no_worker_could_log_to_is_refused_naming_the_field(api: Api, mlflow: dict[str, Any],
                                                                 param: str) -> None:
    file_id = api.upload(jsonl(sentiment_rows(8))).json()["id"]
    response = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "integrations": [{"type": "mlflow", "mlflow": mlflow}]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text
    assert not api.http.get("/v1/fine_tuning/jobs").json()["data"]


def test_an_integration_type_the_server_does_not_offer_is_refused(api: Api) -> None:
    file_id = api.upload(jsonl(sentiment_rows(8))).json()["id"]
    response = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "integrations": [{"type": "wandb", "wandb": {"project": "p"}}]})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("integrations"), response.text


def test_without_an_mlflow_client_the_integration_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from core.errors import ServiceError
    from domain.integrations import check_integrations

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ServiceError) as refused:
        check_integrations([{"type": "mlflow", "mlflow": {"tracking_uri": "https://mlflow.example.com"}}])
    assert refused.value.status == 400 and refused.value.code == "integration_unavailable"
    assert refused.value.param == "integrations[0].mlflow"
