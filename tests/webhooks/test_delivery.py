"""Webhook delivery end to end: real receivers, real workers and beat, Standard Webhooks signatures."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
from openai import OpenAI

from domain import webhooks
from ops.stack import argv
from tests.conftest import Api, Process, wait_until
from tests.data import jsonl, sentiment_rows
from tests.receiver import Received, receiver

TERMINAL_TYPES = {"fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"}


def _endpoint(api: Api, url: str, events: list[str] | None = None) -> dict[str, Any]:
    response = api.http.post("/v1/webhook_endpoints", json={"url": url, "events": events or ["*"]})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["secret"].startswith("whsec_")
    return body


def _verify(secret: str, item: Received) -> dict[str, Any]:
    """Verify with both the standardwebhooks package and the openai SDK; return the payload."""
    payload: dict[str, Any] = standardwebhooks.Webhook(secret).verify(item.body, item.headers)
    OpenAI(api_key="unused", base_url="http://unused").webhooks.unwrap(item.body, item.headers, secret=secret)
    assert item.headers["webhook-id"] == payload["id"]
    return payload


def _bad_job(api: Api) -> dict[str, Any]:
    """A job that fails validation at once: two events without training anything."""
    file_id = api.upload('{"text": "", "label": "a"}\n').json()["id"]
    job: dict[str, Any] = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert",
                                                                     "training_file": file_id}).json()
    return job


def test_a_jobs_whole_life_arrives_signed_in_order(api: Api) -> None:
    with receiver() as endpoint_rx, receiver() as own_rx:
        endpoint = _endpoint(api, endpoint_rx.url)
        file_id = api.upload(jsonl(sentiment_rows(60))).json()["id"]
        job = api.http.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-bert", "training_file": file_id, "webhook_url": own_rx.url,
            "hyperparameters": {"n_epochs": 2, "batch_size": 8}}).json()
        api.wait_status(job["id"], {"succeeded", "failed"})
        wait_until(lambda: "model.created" in endpoint_rx.types() and "fine_tuning.job.succeeded" in own_rx.types(),
                   60, "the terminal events to arrive")
        default_secret = api.http.get("/v1/webhook_endpoints/default_secret").json()["secret"]

        logged = api.http.get("/v1/events", params={"limit": 100}).json()["data"]
        job_events = [e["id"] for e in reversed(logged) if e["data"].get("id") == job["id"]]
        for rx, secret in ((endpoint_rx, endpoint["secret"]), (own_rx, default_secret)):
            payloads = [_verify(secret, item) for item in rx.received]
            arrived = [p["id"] for p in payloads if p["data"].get("id") == job["id"]]
            # Every delivery succeeded at first try, so each arrives once, in order of creation.
            assert arrived == job_events, (arrived, job_events)
        types = [p["type"] for p in (json.loads(r.body) for r in own_rx.received)]
        assert types[0] == "fine_tuning.job.validating_files" and types[-1] == "fine_tuning.job.succeeded"
        assert {"fine_tuning.job.queued", "fine_tuning.job.running", "fine_tuning.job.progress"} <= set(types)
        assert "model.created" not in types, "a job's own URL gets that job's events only"


def test_tampered_body_and_wrong_secret_fail_verification(api: Api) -> None:
    with receiver() as rx:
        endpoint = _endpoint(api, rx.url)
        _bad_job(api)
        wait_until(lambda: len(rx.received) >= 2, 30, "deliveries")
        item = rx.received[0]
        _verify(endpoint["secret"], item)
        tampered = Received(item.headers, item.body.replace(b'"object"', b'"objecT"'))
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(endpoint["secret"]).verify(tampered.body, tampered.headers)
        with pytest.raises(Exception, match="signature"):
            OpenAI(api_key="x", base_url="http://x").webhooks.unwrap(tampered.body, tampered.headers,
                                                                     secret=endpoint["secret"])
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(webhooks.new_secret()).verify(item.body, item.headers)


def test_failures_are_retried_with_the_same_webhook_id(api: Api) -> None:
    with receiver(script=[500, 503]) as rx:
        _endpoint(api, rx.url, ["fine_tuning.job.failed"])
        _bad_job(api)
        wait_until(lambda: len(rx.received) >= 3, 60, "two failures and a success")
        ids = {r.headers["webhook-id"] for r in rx.received}
        assert len(ids) == 1 and len(rx.received) == 3
        event_id = ids.pop()
        attempts = api.http.get(f"/v1/events/{event_id}/deliveries").json()["data"]
        assert sorted(a["status_code"] for a in attempts) == [200, 500, 503]
        assert [a["attempt"] for a in attempts] == [3, 2, 1]
        assert all(a["duration_ms"] >= 0 and a["url"] == rx.url for a in attempts)

        redelivered = api.http.post(f"/v1/events/{event_id}/redeliver")
        assert redelivered.status_code == 200 and redelivered.json()["redelivered_to"] == 1
        wait_until(lambda: len(rx.received) >= 4, 30, "the redelivery")
        assert rx.received[-1].headers["webhook-id"] == event_id


def test_410_disables_the_endpoint(api: Api) -> None:
    with receiver(then=410) as rx:
        endpoint = _endpoint(api, rx.url, ["fine_tuning.job.validating_files", "fine_tuning.job.failed"])
        _bad_job(api)
        wait_until(lambda: api.http.get(f"/v1/webhook_endpoints/{endpoint['id']}").json()["status"] == "disabled",
                   30, "the endpoint to be disabled")
        disabled = api.http.get("/v1/events", params={"type": "webhook_endpoint.disabled"}).json()["data"]
        assert disabled and disabled[0]["data"]["id"] == endpoint["id"]
        assert len(rx.received) <= 2  # nothing more is sent to a disabled endpoint


def test_redirects_are_not_followed(api: Api) -> None:
    with receiver() as target, receiver(then=302) as rx:
        rx.location = target.url
        _endpoint(api, rx.url, ["fine_tuning.job.failed"])
        _bad_job(api)
        wait_until(lambda: len(rx.received) >= 2, 30, "a retry after the redirect")
        assert target.received == []
        event_id = rx.received[0].headers["webhook-id"]
        attempts = api.http.get(f"/v1/events/{event_id}/deliveries").json()["data"]
        assert {a["status_code"] for a in attempts} == {302}


def test_private_addresses_are_refused_unless_allowed() -> None:
    for url in ("http://127.0.0.1/x", "http://localhost:8080/x", "http://10.0.0.8/x", "http://192.168.1.1/",
                "http://169.254.169.254/latest/meta-data", "http://[::1]/x", "ftp://example.com/x"):
        with pytest.raises(webhooks.UnsafeURL):
            webhooks.resolve_safe(url, allow_private=False)
    assert webhooks.resolve_safe("http://127.0.0.1:9/x", allow_private=True)[2] == ["127.0.0.1"]


def test_bad_endpoint_input_is_400(api: Api) -> None:
    for body, param in (({"url": "not a url"}, "url"), ({"url": "http://127.0.0.1/x", "events": ["nope"]}, "events"),
                        ({"url": "http://127.0.0.1/x", "events": []}, "events")):
        response = api.http.post("/v1/webhook_endpoints", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_retries_survive_a_restart_of_worker_and_beat(
    api: Api, stack: dict[str, Process], services: dict[str, str]
) -> None:
    with receiver(script=[500]) as rx:
        _endpoint(api, rx.url, ["fine_tuning.job.failed"])
        stack["beat"].stop()  # no retries may happen while we restart
        _bad_job(api)
        wait_until(lambda: len(rx.received) >= 1, 30, "the first, failing attempt")
        stack["worker-webhooks"].stop()
        env = {k: v for k, v in services.items() if k.startswith("LLMOS_")}
        logs = Path(services["home"]) / "logs"
        stack["worker-webhooks"] = Process("worker-webhooks-2", argv("worker-webhooks"), env, logs)
        stack["beat"] = Process("beat-2", argv("beat"), env, logs)
        wait_until(lambda: len(rx.received) >= 2, 60, "the retry after the restart")
        assert rx.received[0].headers["webhook-id"] == rx.received[1].headers["webhook-id"]


def test_endpoint_crud_and_rotation(api: Api, api_url: str, make_key: Any) -> None:
    with receiver() as rx:
        created = _endpoint(api, rx.url, ["model.created"])
        assert "secret" not in api.http.get(f"/v1/webhook_endpoints/{created['id']}").json()
        patched = api.http.patch(f"/v1/webhook_endpoints/{created['id']}",
                                 json={"events": ["*"], "status": "disabled"}).json()
        assert patched["events"] == ["*"] and patched["status"] == "disabled"
        rotated = api.http.post(f"/v1/webhook_endpoints/{created['id']}/rotate_secret").json()
        assert rotated["secret"] != created["secret"]
        api.http.patch(f"/v1/webhook_endpoints/{created['id']}", json={"status": "enabled"})
        _bad_job(api)
        wait_until(lambda: len(rx.received) >= 1, 30, "a delivery after rotation")
        # Both secrets verify during the 24 h overlap.
        _verify(rotated["secret"], rx.received[0])
        _verify(created["secret"], rx.received[0])
        other = Api(api_url, make_key("someone-else"))
        assert other.http.get(f"/v1/webhook_endpoints/{created['id']}").status_code == 404
        assert api.http.delete(f"/v1/webhook_endpoints/{created['id']}").json()["deleted"] is True
        assert api.http.get("/v1/webhook_endpoints").json()["data"] == []


def test_job_events_stream_live_as_sse_until_the_job_ends(api: Api) -> None:
    job = _bad_job(api)
    lines: list[str] = []
    with api.http.stream("GET", f"/v1/fine_tuning/jobs/{job['id']}/events", params={"stream": "true"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("event: done"):
                break
    data = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {\"id\"")]
    messages = [d["message"] for d in data]
    assert messages[0].startswith("Validating training file")
    assert messages[-1].startswith("Invalid training file")
    assert all(d["object"] == "fine_tuning.job.event" for d in data)


def test_events_tail_prints_the_log(api: Api, api_url: str) -> None:
    import os
    import subprocess

    _bad_job(api)
    wait_until(lambda: any(e["type"] == "fine_tuning.job.failed"
                           for e in api.http.get("/v1/events").json()["data"]), 30, "the failed event")
    key = api.http.headers["authorization"].split()[-1]
    out = subprocess.run([sys.executable, "-m", "ops.cli", "events", "tail", "--no-follow"], capture_output=True,
                         text=True, env={**os.environ, "LLMOS_API_URL": api_url, "LLMOS_API_KEY": key}, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "fine_tuning.job.validating_files" in lines[0] and "fine_tuning.job.failed" in lines[-1]


def test_readme_receivers_verify_a_real_delivery(api: Api) -> None:
    import re

    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    with receiver() as rx:
        endpoint = _endpoint(api, rx.url, ["fine_tuning.job.failed"])
        _bad_job(api)
        wait_until(lambda: rx.received, 30, "a delivery")
        item = rx.received[0]
        for name in ("standardwebhooks", "openai"):
            block = re.search(rf"<!-- webhooks:{name} -->\n```python\n(.*?)```", readme, re.S)
            assert block, name
            namespace: dict[str, Any] = {}
            exec(block.group(1), namespace)
            namespace["verify"](item.body, item.headers, endpoint["secret"])
            with pytest.raises(Exception, match=r"(?i)signature"):
                namespace["verify"](item.body + b" ", item.headers, endpoint["secret"])
