"""Sharing one service between tenants: rate limits, quotas, request bounds and fair training admission."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from tests.conftest import ROOT, Api, Process, wait_until
from tests.data import jsonl, sentiment_rows

DURATION = re.compile(r"^(\d+ms|\d+s|\d+m\d+s)$")


def set_limits(tenant: str, **limits: Any) -> dict[str, Any]:
    from db.session import transaction
    from domain import tenants

    with transaction() as session:
        return tenants.set_limits(session, name=tenant, **limits)


def tenant_api(api_url: str, make_key: Any, tenant: str, **limits: Any) -> Api:
    """A client of a new tenant whose limits are set before its key is first used (so no cache holds them)."""
    key = make_key(tenant)
    if limits:
        set_limits(tenant, **limits)
    return Api(api_url, key)


def test_requests_over_the_rate_limit_get_429_with_openai_headers(api_url: str, make_key: Any) -> None:
    from db.models import WebhookEndpoint
    from db.session import transaction

    limited = tenant_api(api_url, make_key, "limited", rpm=5)
    other = tenant_api(api_url, make_key, "other")
    remaining = []
    for _ in range(5):
        response = limited.http.get("/v1/limits")
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-limit-requests"] == "5"
        assert DURATION.match(response.headers["x-ratelimit-reset-requests"]), response.headers
        remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [4, 3, 2, 1, 0]

    # Over the limit: a POST is refused before anything of it is stored.
    refused = limited.http.post("/v1/webhook_endpoints", json={"url": "http://127.0.0.1:9/hook", "events": ["*"]})
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert 1 <= int(refused.headers["Retry-After"]) <= 75
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    with transaction() as session:
        assert session.scalar(select(func.count()).select_from(WebhookEndpoint)) == 0
    # Errors of an authenticated request carry the headers too, and another tenant is untouched.
    assert limited.http.get("/v1/files/file-nope").status_code == 429
    fine = other.http.get("/v1/files/file-nope")
    assert fine.status_code == 404
    assert fine.headers["x-ratelimit-limit-requests"] == "6000"
    # A request without a valid key is not counted against anyone and carries no limit headers.
    assert "x-ratelimit-limit-requests" not in httpx.get(f"{api_url}/v1/limits").headers


def test_the_limiter_refuses_then_recovers_as_its_window_slides(services: dict[str, str]) -> None:
    """The same script the API runs, on the real Redis, with a one-second window so the test sees it pass."""
    from infra import ratelimit

    async def scenario() -> None:
        tenant = f"t{time.monotonic_ns()}"
        decisions = [await ratelimit.hit(tenant, "rpm", 3, window_ms=1000) for _ in range(4)]
        assert all(d is not None for d in decisions)
        assert [d.allowed for d in decisions if d] == [True, True, True, False]
        refused = decisions[-1]
        assert refused is not None and refused.remaining == 0
        assert refused.retry_after is not None and 0 < refused.retry_after <= 2.0
        # A cost larger than the whole limit never fits: no retry time.
        too_big = await ratelimit.hit(tenant, "tpm", 3, cost=4, window_ms=1000)
        assert too_big is not None and not too_big.allowed and too_big.retry_after is None
        deadline = time.monotonic() + 3
        while True:
            again = await ratelimit.hit(tenant, "rpm", 3, window_ms=1000)
            assert again is not None
            if again.allowed:
                break
            assert time.monotonic() < deadline, "the window never let a request through again"
            await asyncio.sleep(0.05)
        await ratelimit.close()

    asyncio.run(scenario())


def _early_in_a_minute() -> bool:
    """True in the first 50 s of a rate-limit minute (by Redis' clock), so two requests share one window."""
    import redis

    from core.settings import get_settings

    seconds, _ = redis.Redis.from_url(get_settings().resolved_broker_url()).time()
    return seconds % 60 < 50


def test_inference_counts_tokens_per_minute(api_url: str, make_key: Any) -> None:
    from db.models import Inference
    from db.session import transaction

    client = tenant_api(api_url, make_key, "tokens", tpm=300)
    # 15 characters count as 4 tokens before the model sees them; the tokenizer makes more of them, so the
    # correction after the answer is visible in the next request's figures.
    body = {"model": "tiny-gpt2", "prompt": "a a a a a a a a", "max_tokens": 8, "temperature": 0}
    estimate = 4 + 8
    wait_until(_early_in_a_minute, 15, "a fresh rate-limit minute")
    first = client.http.post("/v1/completions", json=body)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-tokens"] == "300"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 300 - estimate
    used = first.json()["usage"]["total_tokens"]
    assert used != estimate
    second = client.http.post("/v1/completions", json=body)
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 300 - used - estimate
    # One request asking for more than the whole budget is refused outright, and nothing is queued.
    with transaction() as session:
        before = session.scalar(select(func.count()).select_from(Inference))
    huge = client.http.post("/v1/completions", json={**body, "max_tokens": 400})
    assert huge.status_code == 429, huge.text
    assert huge.json()["error"]["code"] == "rate_limit_exceeded"
    assert "x-ratelimit-remaining-tokens" in huge.headers
    with transaction() as session:
        assert session.scalar(select(func.count()).select_from(Inference)) == before


def test_active_job_quota_holds_under_concurrent_creation(api_url: str, make_key: Any) -> None:
    client = tenant_api(api_url, make_key, "quota", max_active_jobs=2)
    file_id = client.upload(jsonl(sentiment_rows(40))).json()["id"]
    body = {"model": "tiny-bert", "training_file": file_id, "hyperparameters": {"n_epochs": 1}}

    def create(_: int) -> httpx.Response:
        return client.http.post("/v1/fine_tuning/jobs", json=body)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(create, range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 2 + [429] * 18, [r.text for r in responses if r.status_code not in (200, 429)]
    refusal = next(r for r in responses if r.status_code == 429)
    assert refusal.json()["error"]["code"] == "quota_exceeded"
    assert refusal.json()["error"]["param"] == "max_active_jobs"
    assert "max_active_jobs is 2" in refusal.json()["error"]["message"]
    assert int(refusal.headers["Retry-After"]) > 0
    limits = client.http.get("/v1/limits").json()
    assert (limits["max_active_jobs"], limits["active_jobs"]) == (2, 2)
    for job in (r.json() for r in responses if r.status_code == 200):
        assert client.http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    # Finished jobs free their slots.
    assert client.http.post("/v1/fine_tuning/jobs", json=body).status_code == 200


def test_storage_and_endpoint_quotas_name_the_quota(api_url: str, make_key: Any) -> None:
    from db.models import File
    from db.session import transaction

    client = tenant_api(api_url, make_key, "small", max_storage_bytes=1000, max_webhook_endpoints=1)
    assert client.upload("x" * 600, purpose="batch", name="a.jsonl").status_code == 200
    over = client.upload("y" * 600, purpose="batch", name="b.jsonl")
    assert over.status_code == 429, over.text
    assert over.json()["error"]["param"] == "max_storage_bytes"
    with transaction() as session:
        assert session.scalar(select(func.count()).select_from(File)) == 1
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["*"]}
    assert client.http.post("/v1/webhook_endpoints", json=hook).status_code == 200
    second = client.http.post("/v1/webhook_endpoints", json=hook)
    assert second.status_code == 429 and second.json()["error"]["param"] == "max_webhook_endpoints"
    limits = client.http.get("/v1/limits").json()
    assert limits == {"object": "limits", "rpm": 6000, "tpm": 2_000_000, "max_active_jobs": 100, "active_jobs": 0,
                      "max_storage_bytes": 1000, "storage_bytes": 600, "max_webhook_endpoints": 1,
                      "webhook_endpoints": 1, "max_active_batches": 50, "active_batches": 0, "weight": 1.0}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", "tenants", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_tenants_cli_sets_and_shows_limits(api_url: str, make_key: Any) -> None:
    key = make_key("cli-tenant")
    done = _cli("set", "cli-tenant", "--rpm", "0", "--max-active-jobs", "3", "--weight", "2.5", "--json")
    assert done.returncode == 0, done.stderr
    tenant = json.loads(done.stdout)
    assert (tenant["rpm"], tenant["max_active_jobs"], tenant["weight"]) == (None, 3, 2.5)
    assert "tpm" in tenant["defaults"] and "rpm" not in tenant["defaults"]
    shown = json.loads(_cli("show", "cli-tenant", "--json").stdout)
    assert shown["max_active_jobs"] == 3
    listed = json.loads(_cli("list", "--json").stdout)
    assert [t["name"] for t in listed] == ["cli-tenant"]
    human = _cli("show", "cli-tenant")
    assert "max_active_jobs        3" in human.stdout and "unlimited" in human.stdout
    # rpm 0 is unlimited: the tenant's answers carry no request limit.
    response = Api(api_url, key).http.get("/v1/limits")
    assert response.json()["rpm"] is None and "x-ratelimit-limit-requests" not in response.headers
    for bad in (["set", "nobody", "--rpm", "5"], ["set", "cli-tenant", "--weight", "0"],
                ["set", "cli-tenant", "--rpm", "-1"]):
        failed = _cli(*bad)
        assert failed.returncode != 0 and "error:" in failed.stderr, (bad, failed.stdout)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny-bert", "input": ["x"] * 257}, "input"),
    ({"model": "tiny-bert", "input": "x" * 100_001}, "input"),
])
def test_classification_requests_are_bounded(api: Api, body: dict[str, Any], param: str) -> None:
    response = api.http.post("/v1/classifications", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": ["a"] * 8, "n": 8, "max_tokens": 600}, "max_tokens"),
    ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop"),
    ({"prompt": "a", "stop": "s" * 65}, "stop"),
])
def test_completion_requests_are_bounded(api: Api, body: dict[str, Any], param: str) -> None:
    response = api.http.post("/v1/completions", json={"model": "tiny-gpt2", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    chat = api.http.post("/v1/chat/completions", json={
        "model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}], "n": 8, "max_completion_tokens": 4097})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "max_completion_tokens"


def test_job_priority_is_bounded(api: Api) -> None:
    file_id = api.upload(jsonl(sentiment_rows(20))).json()["id"]
    response = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id,
                                                          "priority": 11})
    assert response.status_code == 400 and response.json()["error"]["param"] == "priority"


def _job(client: Api, file_id: str, epochs: int, batch_size: int = 8, priority: int = 0) -> str:
    response = client.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "priority": priority,
        "hyperparameters": {"n_epochs": epochs, "batch_size": batch_size}})
    assert response.status_code == 200, response.text
    job_id: str = response.json()["id"]
    return job_id


def test_a_flooding_tenant_cannot_push_another_tenants_job_behind_its_queue(api_url: str, make_key: Any) -> None:
    """One training worker: the heavy tenant's long job runs and three more wait when the light tenant's
    single job arrives. The light job is next in line, the heavy tenant's own priorities order the rest, and
    the moment the worker is free the light job is the one that starts."""
    heavy, light = tenant_api(api_url, make_key, "heavy"), tenant_api(api_url, make_key, "light")
    heavy_file = heavy.upload(jsonl(sentiment_rows(120))).json()["id"]
    light_file = light.upload(jsonl(sentiment_rows(40))).json()["id"]
    # Long enough to still be running while the rest is submitted; cancelled below.
    running = _job(heavy, heavy_file, epochs=100, batch_size=1)
    heavy.wait_status(running, {"running"}, timeout=60)
    low, high, normal = (_job(heavy, heavy_file, 1, priority=p) for p in (-5, 5, 0))
    for job_id in (low, high, normal):
        heavy.wait_status(job_id, {"queued"}, timeout=60)
    single = _job(light, light_file, 1)
    light.wait_status(single, {"queued"}, timeout=60)

    positions = {job_id: client.job(job_id)["queue_position"] for client, job_id in
                 ((light, single), (heavy, high), (heavy, normal), (heavy, low))}
    assert positions == {single: 1, high: 2, normal: 3, low: 4}, positions
    assert heavy.job(running)["queue_position"] is None
    listed = {j["id"]: j["queue_position"] for j in heavy.http.get("/v1/fine_tuning/jobs").json()["data"]}
    assert listed[high] == 2 and listed[running] is None

    assert heavy.http.post(f"/v1/fine_tuning/jobs/{running}/cancel").status_code == 200
    light.wait_status(single, {"running", "succeeded"}, timeout=60)
    # The heavy tenant's jobs waited while the light one took the free worker.
    assert {heavy.job(j)["status"] for j in (low, high, normal)} == {"queued"}
    light.wait_status(single, {"succeeded"}, timeout=120)
    order = [job_id for job_id in _start_order((single, high, normal, low))]
    assert order[0] == single, order
    for job_id in (low, high, normal):
        assert heavy.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200


def test_a_burst_of_jobs_cannot_hold_another_tenants_jobs_in_validation(
        api_url: str, make_key: Any, stack: dict[str, Process]) -> None:
    """Validation takes tenants in turn: with the cpu worker stopped, one tenant creates seven jobs and then
    another tenant two. Once a cpu worker runs again, the tenants alternate, so the second tenant's jobs are
    the second and the fourth to start validating (give or take the worker's two processes' timing), not
    the last two, as the broker's first-come order of tickets would have it."""
    from db.models import FineTuningJob
    from db.session import transaction

    heavy, light = tenant_api(api_url, make_key, "burst"), tenant_api(api_url, make_key, "pair")
    heavy_file = heavy.upload(jsonl(sentiment_rows(40))).json()["id"]
    light_file = light.upload(jsonl(sentiment_rows(40))).json()["id"]
    stack["worker-cpu"].stop()
    try:
        burst = [_job(heavy, heavy_file, 1) for _ in range(7)]
        pair = [_job(light, light_file, 1) for _ in range(2)]
    finally:
        stack["worker-cpu"] = stack["worker-cpu"].respawn("worker-cpu-fair")
    everyone = [*((heavy, j) for j in burst), *((light, j) for j in pair)]
    for client, job_id in everyone:
        client.wait_status(job_id, {"queued", "running", "succeeded"}, timeout=90)
    with transaction() as session:
        order = list(session.scalars(select(FineTuningJob.id).where(FineTuningJob.id.in_([*burst, *pair]))
                                     .order_by(FineTuningJob.validation_started_at)))
    places = [order.index(job_id) + 1 for job_id in pair]
    assert places[0] <= 2 and places[1] <= 4, places
    for client, job_id in everyone:
        client.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")


def _start_order(job_ids: tuple[str, ...]) -> list[str]:
    from db.models import JobClaim
    from db.session import transaction

    with transaction() as session:
        claims = session.execute(select(JobClaim.job_id).where(JobClaim.job_id.in_(job_ids))
                                 .order_by(JobClaim.claimed_at)).scalars().all()
    return list(claims)


def test_priorities_order_a_tenants_own_jobs(api_url: str, make_key: Any) -> None:
    client = tenant_api(api_url, make_key, "solo")
    file_id = client.upload(jsonl(sentiment_rows(120))).json()["id"]
    blocker = _job(client, file_id, epochs=100, batch_size=1)
    client.wait_status(blocker, {"running"}, timeout=60)
    first, urgent = _job(client, file_id, 1), _job(client, file_id, 1, priority=10)
    for job_id in (first, urgent):
        client.wait_status(job_id, {"queued"}, timeout=60)
    assert (client.job(urgent)["queue_position"], client.job(first)["queue_position"]) == (1, 2)
    assert client.http.post(f"/v1/fine_tuning/jobs/{blocker}/cancel").status_code == 200
    client.wait_status(first, {"succeeded"}, timeout=120)
    assert _start_order((first, urgent)) == [urgent, first]
    assert wait_until(lambda: client.job(urgent)["status"] == "succeeded", 60, "the urgent job to finish")
