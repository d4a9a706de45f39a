"""Object storage (`LLMOS_STORAGE_URL=s3://…`) end to end, against moto's S3 server as a real HTTP endpoint.

The stack here is a second deployment beside the suite's own: its own database on the same Postgres, its
own embedded Redis (so the suite's workers never take its tasks), its own LLMOS_HOME, and a bucket. Files,
results, checkpoints and models must be in the bucket, not under LLMOS_HOME, and a job whose worker is
killed must resume on a worker with a different LLMOS_HOME from the checkpoint it uploaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.conftest import ROOT, Api, Process, _drop_database, _fresh_database, free_port, wait_until
from tests.data import jsonl, sentiment_rows

BUCKET = "llmos-artifacts"
PREFIX = "deploy-1"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_server(**env: str) -> Iterator[str]:
    """moto's S3 server (its server mode, a real HTTP endpoint) as a subprocess on a free port; its URL."""
    port = free_port()
    with tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        endpoint = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"moto_server exited:\n{Path(log.name).read_text()}")
            try:
                return httpx.get(f"{endpoint}/moto-api/", timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        try:
            wait_until(up, 30, "moto_server to answer")
            yield endpoint
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(10)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server with an empty bucket."""
    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint, **_aws()).create_bucket(Bucket=BUCKET)
        yield endpoint


def _aws() -> dict[str, str]:
    return {"aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
            "region_name": AWS["AWS_DEFAULT_REGION"]}


def bucket_keys(endpoint: str, prefix: str = "") -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, **_aws())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/{prefix}")
    return [item["Key"].removeprefix(f"{PREFIX}/") for page in pages for item in page.get("Contents", [])]


class S3Stack:
    def __init__(self, endpoint: str, env: dict[str, str], procs: dict[str, Process], url: str, key: str,
                 log_dir: Path) -> None:
        self.endpoint, self.env, self.procs, self.url, self.log_dir = endpoint, env, procs, url, log_dir
        self.api = Api(url, key)
        self.home = Path(env["LLMOS_HOME"])


def _llmos(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def s3_stack(services: dict[str, str], s3_endpoint: str) -> Iterator[S3Stack]:
    """API, workers and beat with artifacts in the bucket: the commands `llmos up` runs."""
    from ops import stack as deployment

    scratch = Path(tempfile.mkdtemp(prefix="llmos-s3-test-"))
    home = scratch / "home-a"
    home.mkdir()
    # The base models the suite already built (the registry's paths are read by every worker).
    (home / "models").symlink_to(Path(services["home"]) / "models", target_is_directory=True)
    database_url = _fresh_database(services["LLMOS_DATABASE_URL"])
    servers = deployment.start_servers(scratch / "servers", database_url, None)
    env = {k: v for k, v in services.items() if k.startswith("LLMOS_")}
    env.update({
        "LLMOS_HOME": str(home), "LLMOS_DATABASE_URL": database_url, "LLMOS_BROKER_URL": servers.broker_url,
        "LLMOS_API_PORT": str(free_port()), "LLMOS_STORAGE_URL": f"s3://{BUCKET}/{PREFIX}",
        "LLMOS_S3_ENDPOINT_URL": s3_endpoint, **AWS,
    })
    procs: dict[str, Process] = {}
    try:
        migrated = _llmos(env, "migrate")
        assert migrated.returncode == 0, migrated.stderr
        created = _llmos(env, "keys", "create", "--tenant", "acme", "--scope",
                         "files,fine_tuning,batches,inference", "--json")
        assert created.returncode == 0, created.stderr
        key = json.loads(created.stdout)["key"]
        # Beside the suite's own logs (pytest keeps them), not in the scratch dir removed at the end.
        log_dir = Path(services["home"]) / "logs" / "object-storage"
        log_dir.mkdir(parents=True, exist_ok=True)
        procs.update({role: Process(f"s3-{role}", deployment.argv(role), env, log_dir)
                      for role in ("api", "worker-gpu", "worker-inference", "worker-cpu", "beat")})
        url = f"http://127.0.0.1:{env['LLMOS_API_PORT']}"

        def api_up() -> bool:
            if procs["api"].popen.poll() is not None:
                raise AssertionError(f"API exited:\n{procs['api'].tail()}")
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(api_up, 90, "the object-storage stack's API")
        yield S3Stack(s3_endpoint, env, procs, url, key, log_dir)
    finally:
        for proc in procs.values():
            proc.stop()
        servers.stop()
        _drop_database(database_url)
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_bad_bucket_endpoint_or_key_stops_start_up_naming_the_setting(services: dict[str, str],
                                                                          s3_endpoint: str) -> None:
    env = {"LLMOS_DATABASE_URL": services["LLMOS_DATABASE_URL"], "LLMOS_HOME": services["home"],
           "LLMOS_STORAGE_URL": "s3://no-such-bucket/x", "LLMOS_S3_ENDPOINT_URL": s3_endpoint, **AWS}
    refused = _llmos(env, "migrate")
    assert refused.returncode != 0
    assert "LLMOS_STORAGE_URL" in refused.stderr and "no-such-bucket" in refused.stderr, refused.stderr
    assert "does not exist" in refused.stderr, refused.stderr

    unreachable = _llmos({**env, "LLMOS_STORAGE_URL": f"s3://{BUCKET}/x",
                          "LLMOS_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, "migrate")
    assert unreachable.returncode != 0
    assert "LLMOS_S3_ENDPOINT_URL" in unreachable.stderr and "cannot reach" in unreachable.stderr, \
        unreachable.stderr

    # A server that checks signatures against its own (empty) set of users: our keys are unknown to it.
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as checking:
        refused = _llmos({**env, "LLMOS_STORAGE_URL": f"s3://{BUCKET}/x", "LLMOS_S3_ENDPOINT_URL": checking},
                         "migrate")
    assert refused.returncode != 0
    assert "refused these credentials" in refused.stderr and "AWS_ACCESS_KEY_ID" in refused.stderr, refused.stderr


def test_the_cache_stays_within_its_budget_evicting_the_least_recently_used(
        s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings
    from domain import storage
    from infra import objectstore

    env = {"LLMOS_HOME": str(tmp_path / "home"), "LLMOS_STORAGE_URL": f"s3://{BUCKET}/cache-test",
           "LLMOS_S3_ENDPOINT_URL": s3_endpoint, "LLMOS_STORAGE_CACHE_MB": "1", **AWS}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    storage.use_object_store(objectstore.S3ObjectStore)
    try:
        locations = []
        for i in range(3):
            source = tmp_path / f"object-{i}"
            source.write_bytes(bytes([i]) * 400_000)
            locations.append(storage.publish(source, f"files/t/object-{i}"))
        first, second = storage.materialize(locations[0]), storage.materialize(locations[1])
        storage.materialize(locations[0])  # used again: the second is now the least recently used
        third = storage.materialize(locations[2])
        assert first.exists() and third.exists() and not second.exists()
        assert storage.cached_bytes() <= 1024 * 1024
        assert storage.materialize(locations[1]).read_bytes() == bytes([1]) * 400_000  # fetched again
        assert storage.cached_bytes() <= 1024 * 1024
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        storage.use_object_store(objectstore.S3ObjectStore)


def test_an_upload_lives_in_the_bucket_and_reads_back(s3_stack: S3Stack) -> None:
    content = jsonl(sentiment_rows(12))
    uploaded = s3_stack.api.upload(content)
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]

    stored = [k for k in bucket_keys(s3_stack.endpoint, "files/") if k.endswith(f"/{file_id}")]
    assert len(stored) == 1, bucket_keys(s3_stack.endpoint)
    files_dir = s3_stack.home / "files"
    assert not files_dir.exists() or not any(p.is_file() for p in files_dir.rglob("*"))
    assert not any((s3_stack.home / "staging").rglob(file_id)), "the staging copy was removed"

    downloaded = s3_stack.api.http.get(f"/v1/files/{file_id}/content")
    assert downloaded.status_code == 200 and downloaded.text == content

    assert s3_stack.api.http.delete(f"/v1/files/{file_id}").status_code == 200
    assert not [k for k in bucket_keys(s3_stack.endpoint, "files/") if k.endswith(f"/{file_id}")]
    assert s3_stack.api.http.get(f"/v1/files/{file_id}/content").status_code == 404


def test_a_fine_tuned_model_is_kept_in_the_bucket_and_serves(s3_stack: S3Stack) -> None:
    api = s3_stack.api
    file_id = api.upload(jsonl(sentiment_rows(80))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "seed": 7,
        "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate": 3e-3}}).json()
    done = api.wait_status(job["id"], {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["status"] == "succeeded", done["error"]
    model = done["fine_tuned_model"]

    keys = bucket_keys(s3_stack.endpoint, f"jobs/{job['id']}/")
    assert f"jobs/{job['id']}/model/.published" in keys and f"jobs/{job['id']}/model/config.json" in keys, keys
    assert f"jobs/{job['id']}/results.csv" in keys
    assert any(k.startswith(f"jobs/{job['id']}/checkpoints/checkpoint-") for k in keys), keys
    # The worker's working copy went once everything was uploaded.
    assert not (s3_stack.home / "artifacts" / "jobs" / job["id"]).exists()

    results = api.http.get(f"/v1/files/{done['result_files'][0]}/content")
    assert results.status_code == 200 and results.text.splitlines()[0].startswith("step"), results.text[:200]

    tar = api.http.get(f"/v1/models/{model}/content")
    assert tar.status_code == 200, tar.text
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        names = archive.getnames()
    assert any(n.endswith("config.json") for n in names), names

    # Served by the inference worker from its cached copy: a batch of 30 lines (two chunks, each published
    # to the bucket and merged by settling).
    final, output = _classify_in_a_batch(api, model, 30)
    assert [o["custom_id"] for o in output] == [f"row-{i}" for i in range(30)]
    assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["data"] for o in output), output[0]
    assert [k for k in bucket_keys(s3_stack.endpoint, "files/") if k.endswith(final["output_file_id"])]
    assert not bucket_keys(s3_stack.endpoint, f"batches/{final['id']}/"), "the batch's work files were removed"

    # Online too: the inference worker reads the model from its cache of the bucket, with the batch's answers.
    online = api.http.post("/v1/classifications", json={"model": model, "input": sentiment_rows(30, seed=5)[0]["text"]},
                           headers={"Cache-Control": "no-cache"})
    assert online.status_code == 200, online.text
    assert online.json()["data"][0]["label"] == output[0]["response"]["body"]["data"][0]["label"]


def _fine_tune(api: Api, model: str, **hyperparameters: Any) -> str:
    file_id = api.upload(jsonl(sentiment_rows(80))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": model, "training_file": file_id, "seed": 7,
        "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate": 3e-3, **hyperparameters}}).json()
    done = api.wait_status(job["id"], {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["status"] == "succeeded", done["error"]
    fine_tuned: str = done["fine_tuned_model"]
    return fine_tuned


def _classify_in_a_batch(api: Api, model: str, n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A batch of `n` classification lines on `model`, completed: the batch and its output lines."""
    lines = [{"custom_id": f"row-{i}", "method": "POST", "url": "/v1/classifications",
              "body": {"model": model, "input": row["text"]}} for i, row in enumerate(sentiment_rows(n, seed=5))]
    batch_file = api.upload(jsonl(lines), purpose="batch", name="batch.jsonl").json()["id"]
    batch = api.http.post("/v1/batches", json={"input_file_id": batch_file, "endpoint": "/v1/classifications",
                                                "completion_window": "24h"}).json()

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = api.http.get(f"/v1/batches/{batch['id']}").json()
        return body if body["status"] in {"completed", "failed", "expired", "cancelled"} else None

    final: dict[str, Any] = wait_until(finished, 180, "the batch to finish", 0.2)
    assert final["status"] == "completed", final
    return final, [json.loads(line) for line in api.http.get(f"/v1/files/{final['output_file_id']}/content").text
                   .splitlines()]


def test_a_lora_model_on_a_bucket_model_serves_after_the_cache_is_emptied(s3_stack: S3Stack) -> None:
    api = s3_stack.api
    base = _fine_tune(api, "tiny-bert")
    # LoRA on a fine-tuned model: the adapter's manifest names its base, which lives in the bucket too.
    adapter = _fine_tune(api, base, lora=True, learning_rate=2e-2)
    job_id = adapter.rsplit(":", 1)[-1]
    assert f"jobs/{job_id}/model/.llmos-references.json" in bucket_keys(s3_stack.endpoint, f"jobs/{job_id}/model/")

    # As on a machine that never held either model: both come back from the bucket, the base where the
    # adapter's manifest now points.
    shutil.rmtree(s3_stack.home / "cache" / "storage" / "objects", ignore_errors=True)
    _, output = _classify_in_a_batch(api, adapter, 5)
    assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["data"] for o in output), output[0]


def test_a_job_resumes_on_another_host_from_the_uploaded_checkpoint(s3_stack: S3Stack) -> None:
    api = s3_stack.api
    file_id = api.upload(jsonl(sentiment_rows(200))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "seed": 3,
        "hyperparameters": {"n_epochs": 12, "batch_size": 4}}).json()
    prefix = f"jobs/{job['id']}/checkpoints/"
    wait_until(lambda: any(k.endswith("/.published") for k in bucket_keys(s3_stack.endpoint, prefix)), 180,
               "the first checkpoint in the bucket")

    worker_a = s3_stack.procs["worker-gpu"]
    os.killpg(worker_a.popen.pid, signal.SIGKILL)  # a crash: nothing more is written or uploaded
    worker_a.popen.wait(30)
    uploaded = sorted(int(k[len(prefix):].split("/")[0].rsplit("-", 1)[1])
                      for k in bucket_keys(s3_stack.endpoint, prefix) if k.endswith("/.published"))

    # Another machine: nothing of host A's LLMOS_HOME, only the database, the broker and the bucket.
    home_b = s3_stack.home.parent / "home-b"
    home_b.mkdir()
    env_b = {**s3_stack.env, "LLMOS_HOME": str(home_b)}
    s3_stack.procs["worker-gpu"] = Process("s3-worker-gpu-b", worker_a.argv, env_b, s3_stack.log_dir)
    worker_a.stop()

    resumed = wait_until(lambda: [m for m in api.messages(job["id"]) if m.startswith("resumed from checkpoint")],
                         120, "host B to resume the job")
    resumed_step = int(resumed[-1].rsplit(" ", 1)[-1])
    assert resumed_step == uploaded[-1], (resumed, uploaded)
    final = api.wait_status(job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert final["status"] == "succeeded", final["error"]
    assert final["attempts"] == 2
    keys = bucket_keys(s3_stack.endpoint, f"jobs/{job['id']}/")
    assert f"jobs/{job['id']}/model/.published" in keys
    # Host B downloaded the checkpoint from the bucket (host A's disk is not B's to read).
    log_b = (s3_stack.log_dir / "s3-worker-gpu-b.log").read_text()
    assert f"restored checkpoint checkpoint-{resumed_step} of {job['id']}" in log_b, log_b[-3000:]
