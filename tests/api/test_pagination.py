"""Lists are newest first with `after`, `limit` and `has_more`."""

from __future__ import annotations

from tests.conftest import Api
from tests.data import jsonl, sentiment_rows


def test_files_and_jobs_paginate_newest_first(api: Api) -> None:
    ids = [api.upload(jsonl(sentiment_rows(4, seed=i))).json()["id"] for i in range(5)]
    newest_first = list(reversed(ids))
    page = api.http.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in page["data"]] == newest_first[:2] and page["has_more"] is True
    page = api.http.get("/v1/files", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [f["id"] for f in page["data"]] == newest_first[2:4] and page["has_more"] is True
    page = api.http.get("/v1/files", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [f["id"] for f in page["data"]] == newest_first[4:] and page["has_more"] is False
    assert api.http.get("/v1/files", params={"limit": 0}).status_code == 400
    assert api.http.get("/v1/files", params={"limit": 101}).status_code == 400
    assert api.http.get("/v1/files", params={"after": "file-unknown"}).status_code == 400

    jobs = []
    for i in range(3):
        body = {"model": "tiny-bert", "training_file": ids[0], "metadata": {"n": str(i)},
                "hyperparameters": {"n_epochs": 1}}
        jobs.append(api.http.post("/v1/fine_tuning/jobs", json=body).json()["id"])
    listed = api.http.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in listed["data"]] == [jobs[2], jobs[1]] and listed["has_more"]
    rest = api.http.get("/v1/fine_tuning/jobs", params={"after": jobs[1]}).json()
    assert [j["id"] for j in rest["data"]] == [jobs[0]] and not rest["has_more"]
    tagged = api.http.get("/v1/fine_tuning/jobs", params={"metadata[n]": "1"}).json()
    assert [j["id"] for j in tagged["data"]] == [jobs[1]]
    for job_id in jobs:
        api.wait_status(job_id, {"succeeded", "failed"})
