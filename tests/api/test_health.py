"""Operations endpoints answer from the real database and broker."""

from __future__ import annotations

from tests.conftest import Api
from tests.data import jsonl, sentiment_rows


def _sample(metrics: str, series: str) -> float:
    """The value of one series in a Prometheus text scrape; 0 when it has not been counted yet."""
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_ready_and_metrics(api: Api, anon: Api) -> None:
    assert anon.http.get("/healthz").json() == {"status": "ok"}
    ready = anon.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "migrations": "ok", "broker": "ok"}

    created = 'llmos_http_requests_total{method="POST",route="/v1/fine_tuning/jobs",status="200"}'
    before = _sample(anon.http.get("/metrics").text, created)
    file_id = api.upload(jsonl(sentiment_rows(10))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id,
                                                      "hyperparameters": {"n_epochs": 1}}).json()
    assert api.wait_status(job["id"], {"succeeded", "failed"})["status"] == "succeeded"
    # Whichever API process answers the scrape counts every process's requests.
    for _ in range(4):
        metrics = anon.http.get("/metrics").text
        assert 'llmos_jobs{status="succeeded"} 1.0' in metrics
        assert _sample(metrics, created) == before + 1
    assert 'llmos_queue_depth{queue="gpu"}' in metrics


def test_openapi_documents_the_routes(anon: Api) -> None:
    paths = anon.http.get("/openapi.json").json()["paths"]
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{job_id}/events", "/v1/models",
                 "/v1/classifications", "/readyz"):
        assert path in paths
    assert anon.http.get("/docs").status_code == 200


def test_metrics_labels_carry_no_raw_client_input(anon: Api) -> None:
    # Methods the HTTP parser accepts but no route serves (it refuses made-up ones itself).
    for method in ("PROPFIND", "PURGE"):
        anon.http.request(method, "/healthz")
    metrics = anon.http.get("/metrics").text
    assert "PROPFIND" not in metrics and "PURGE" not in metrics
    assert 'method="OTHER"' in metrics
