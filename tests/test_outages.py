"""Outages of the broker and the database, on servers this test starts and stops itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ops.embedded import EmbeddedServer, start_postgres, start_redis, stop_server
from ops.stack import argv, llmos, start_servers
from ops.supervisor import ChildSpec, Supervisor
from tests.conftest import ROOT, Api, free_port, wait_until
from tests.data import jsonl, sentiment_rows


class Outage:
    """Its own Postgres, Redis, API, workers and beat, so stopping a server harms no other test."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="llmos-outage-"))
        # Its servers and processes as `llmos up` starts them (ops/stack.py).
        self.pg, self.redis = start_servers(self.dir, None, None).embedded
        self.env = {
            "LLMOS_HOME": str(self.dir / "home"), "LLMOS_DATABASE_URL": self.pg.url,
            "LLMOS_BROKER_URL": self.redis.url, "LLMOS_API_PORT": str(free_port()),
            "LLMOS_HEARTBEAT_SECONDS": "0.3", "LLMOS_RECONCILE_SECONDS": "1", "LLMOS_REQUEUE_AFTER_SECONDS": "2",
            "LLMOS_STALE_HEARTBEAT_SECONDS": "3",
        }
        subprocess.run(llmos("migrate"), cwd=ROOT, env={**os.environ, **self.env},
                       check=True, capture_output=True, timeout=180)
        key = subprocess.run(llmos("keys", "create", "--tenant", "outage"), cwd=ROOT,
                             env={**os.environ, **self.env}, check=True, capture_output=True, text=True, timeout=60)
        self.logs = self.dir / "logs"
        # Under the supervisor of `llmos up`, which restarts a child that exits: the Redis transport can
        # take a worker down when the broker vanishes mid-acknowledgement (an AttributeError in its channel
        # close), and in production the supervisor or the container's restart policy brings it back.
        self.supervisor = Supervisor(self.logs)
        for role in ("api", "worker-gpu", "worker-cpu", "beat"):
            self.supervisor.add(ChildSpec(f"outage-{role}", argv(role), self.env, ROOT))
        self.supervisor.start()
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="outage supervisor", daemon=True)
        self._watcher.start()
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
        return start(self.dir / server.name, port=server.port)

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            self.supervisor.poll()

    def log_tail(self, name: str, lines: int = 200) -> str:
        text = (self.logs / f"outage-{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        self._stopping.set()
        self._watcher.join()
        self.supervisor.stop()
        for server in (self.redis, self.pg):
            stop_server(server)
        # With it goes, as root, its cluster in the embedded servers' area (tests/conftest.py prunes those).
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def outage() -> Iterator[Outage]:
    stack = Outage()
    try:
        yield stack
    finally:
        stack.close()


def test_jobs_survive_broker_and_database_outages_and_the_api_says_503_only_while_postgres_is_down(
    outage: Outage,
) -> None:
    api = outage.api
    file_id = api.upload(jsonl(sentiment_rows(400))).json()["id"]
    # A long job that is running through both outages.
    running = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id,
                                                          "hyperparameters": {"n_epochs": 50, "batch_size": 4}})
    running_id = running.json()["id"]
    wait_until(lambda: (api.job(running_id).get("progress") or {}).get("step", 0) > 5, 120, "training to start")

    stop_server(outage.redis)
    assert api.http.get("/readyz").status_code == 503
    # Online inference cannot be queued: the caller hears so at once, and the request is not left dangling.
    refused = api.http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 2})
    assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
    assert refused.json()["error"]["code"] == "broker_unavailable"
    created = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id,
                                                          "hyperparameters": {"n_epochs": 1}})
    assert created.status_code == 200, created.text  # persisted although the broker is down
    queued_id = created.json()["id"]
    assert api.job(queued_id)["status"] == "validating_files"
    outage.redis = outage.restart(outage.redis)
    # The reconciler re-sends the lost validation task; workers reconnect by themselves.
    wait_until(lambda: api.job(queued_id)["status"] == "queued", 120, "the lost task to be re-sent")

    before = api.job(running_id)
    assert before["status"] == "running"
    stop_server(outage.pg)
    outage_started = time.monotonic()
    # Every API process, whether its pooled connections just died or it must open new ones (refused), and
    # a key it has not cached yet: 503 each time, never a 500.
    stranger = Api(outage.url, "sk-llmos-not-cached-anywhere")
    for client in (api, api, api, api, stranger, stranger):
        down = client.http.get("/v1/fine_tuning/jobs")
        assert down.status_code == 503 and down.headers["retry-after"], down.text
        assert down.json()["error"]["code"] == "database_unavailable"
    assert api.http.get("/readyz").status_code == 503
    # Down long enough that every heartbeat looks stale (LLMOS_STALE_HEARTBEAT_SECONDS=3), as the worker saw.
    wait_until(lambda: "heartbeat of" in outage.log_tail("worker-gpu") and time.monotonic() - outage_started > 5, 60,
               "the training worker to notice the outage")

    outage.pg = outage.restart(outage.pg)
    wait_until(lambda: api.http.get("/v1/fine_tuning/jobs").status_code == 200, 60, "the API to recover")
    assert api.http.get("/readyz").status_code == 200
    # The same attempt trained on through the outage: not requeued, not failed, progress moving again.
    wait_until(lambda: api.job(running_id)["progress"]["step"] > before["progress"]["step"] + 5, 120,
               "training to continue after the outage")
    after = api.job(running_id)
    assert after["status"] == "running" and after["attempts"] == 1, after
    assert not [m for m in api.messages(running_id) if "requeued" in m]
    assert api.http.post(f"/v1/fine_tuning/jobs/{running_id}/cancel").status_code == 200
    assert api.wait_status(running_id, {"cancelled", "failed", "succeeded"})["status"] == "cancelled"
    # The job created while the broker was down trains once the worker is free.
    assert api.wait_status(queued_id, {"succeeded", "failed"}, timeout=180)["status"] == "succeeded"
