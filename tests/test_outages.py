"""Outages of the broker and the database, on servers this test starts and stops itself."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ops.embedded import EmbeddedServer, start_postgres, start_redis, stop_server
from tests.conftest import ROOT, Api, Process, free_port, wait_until
from tests.data import jsonl, sentiment_rows


class Outage:
    """Its own Postgres, Redis, API, workers and beat, so stopping a server harms no other test."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="llmos-outage-"))
        self.pg = start_postgres(self.dir / "pg")
        self.redis = start_redis(self.dir / "redis")
        self.env = {
            "LLMOS_HOME": str(self.dir / "home"), "LLMOS_DATABASE_URL": self.pg.url,
            "LLMOS_BROKER_URL": self.redis.url, "LLMOS_API_PORT": str(free_port()),
            "LLMOS_HEARTBEAT_SECONDS": "0.3", "LLMOS_RECONCILE_SECONDS": "1", "LLMOS_REQUEUE_AFTER_SECONDS": "2",
        }
        subprocess.run([sys.executable, "-m", "ops.cli", "migrate"], cwd=ROOT, env={**os.environ, **self.env},
                       check=True, capture_output=True, timeout=180)
        key = subprocess.run([sys.executable, "-m", "ops.cli", "keys", "create", "--tenant", "outage"], cwd=ROOT,
                             env={**os.environ, **self.env}, check=True, capture_output=True, text=True, timeout=60)
        logs = self.dir / "logs"
        logs.mkdir()
        cli = [sys.executable, "-m", "ops.cli"]
        self.procs = [Process(f"outage-{name}", [*cli, *argv], self.env, logs) for name, argv in (
            ("api", ["api"]), ("gpu", ["worker", "--queues", "gpu"]), ("cpu", ["worker", "--queues", "cpu"]),
            ("beat", ["beat"]))]
        self.url = f"http://127.0.0.1:{self.env['LLMOS_API_PORT']}"
        self.api = Api(self.url, key.stdout.strip().splitlines()[-1])
        wait_until(self._healthy, 60, "the outage stack's API")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def restart(self, server: EmbeddedServer) -> EmbeddedServer:
        start = start_postgres if server.name == "postgres" else start_redis
        data = self.dir / ("pg" if server.name == "postgres" else "redis")
        return start(data, port=server.port)

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        for server in (self.redis, self.pg):
            stop_server(server)


@pytest.fixture
def outage() -> Iterator[Outage]:
    stack = Outage()
    try:
        yield stack
    finally:
        stack.close()


def test_jobs_survive_a_broker_outage_and_the_api_says_503_only_while_postgres_is_down(outage: Outage) -> None:
    api = outage.api
    file_id = api.upload(jsonl(sentiment_rows(60))).json()["id"]

    stop_server(outage.redis)
    assert api.http.get("/readyz").status_code == 503
    created = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id,
                                                          "hyperparameters": {"n_epochs": 2}})
    assert created.status_code == 200, created.text  # persisted although the broker is down
    job_id = created.json()["id"]
    assert api.job(job_id)["status"] == "validating_files"

    outage.redis = outage.restart(outage.redis)
    # The reconciler re-sends the lost task; workers reconnect by themselves.
    assert api.wait_status(job_id, {"succeeded", "failed"}, timeout=180)["status"] == "succeeded"

    stop_server(outage.pg)
    down = api.http.get("/v1/fine_tuning/jobs")
    assert down.status_code == 503 and down.headers["retry-after"]
    assert down.json()["error"]["code"] == "database_unavailable"
    assert api.http.get("/readyz").status_code == 503

    outage.pg = outage.restart(outage.pg)
    wait_until(lambda: api.http.get("/v1/fine_tuning/jobs").status_code == 200, 60, "the API to recover")
    assert api.job(job_id)["status"] == "succeeded"
    assert api.http.get("/readyz").status_code == 200
