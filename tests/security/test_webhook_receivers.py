"""Hostile webhook receivers: one that trickles its answer, one that never stops sending. Neither holds a
worker past one deadline, neither is read past 64 KiB, and other endpoints keep receiving meanwhile."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.conftest import Api, wait_until
from tests.receiver import hostile, receiver, trickle

# The suite's stack runs with the default deadline.
DEADLINE_S = 10.0


def endless(handler: BaseHTTPRequestHandler) -> None:
    """200 and a chunked body that never ends, with control characters in it."""
    handler.send_response(200)
    handler.send_header("transfer-encoding", "chunked")
    handler.end_headers()
    chunk = b"ok\x1b[31m\x00" + b"z" * 8192
    while True:
        handler.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")


def _endpoint(api: Api, url: str) -> None:
    response = api.http.post("/v1/webhook_endpoints", json={"url": url, "events": ["fine_tuning.job.failed"]})
    assert response.status_code == 200, response.text


def _failing_job(api: Api) -> str:
    file_id = api.upload('{"text": "", "label": "a"}\n').json()["id"]
    job: dict[str, Any] = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert",
                                                                     "training_file": file_id}).json()
    return str(job["id"])


def _attempts(api: Api) -> list[dict[str, Any]]:
    events = api.http.get("/v1/events", params={"type": "fine_tuning.job.failed"}).json()["data"]
    if not events:
        return []
    data: list[dict[str, Any]] = api.http.get(f"/v1/events/{events[0]['id']}/deliveries").json()["data"]
    return data


def test_a_trickling_receiver_gets_one_deadline_and_does_not_delay_other_endpoints(api: Api) -> None:
    with hostile(trickle) as (slow_url, slow_arrivals), receiver() as fast:
        _endpoint(api, slow_url)
        _endpoint(api, fast.url)
        _failing_job(api)
        wait_until(lambda: slow_arrivals and fast.received, 30, "both endpoints to be called")
        slow_attempt = wait_until(lambda: [a for a in _attempts(api) if a["url"] == slow_url], 40,
                                  "the trickling attempt to end")[0]
    assert slow_attempt["status_code"] is None
    assert slow_attempt["error"] == f"no complete answer within {DEADLINE_S:g}s"
    # One deadline from connect to last byte: not 1000 reads of 2 s each.
    assert DEADLINE_S * 1000 <= slow_attempt["duration_ms"] < (DEADLINE_S + 3) * 1000
    fast_attempt = next(a for a in _attempts(api) if a["url"] == fast.url)
    assert fast_attempt["status_code"] == 200


def test_an_endless_answer_is_read_to_64_kib_and_kept_as_a_clean_excerpt(api: Api) -> None:
    with hostile(endless) as (url, _):
        _endpoint(api, url)
        _failing_job(api)
        attempt = wait_until(lambda: _attempts(api), 40, "the attempt to be recorded")[0]
    assert attempt["status_code"] == 200 and attempt["error"] is None
    assert attempt["duration_ms"] < DEADLINE_S * 1000
    excerpt = attempt["response_excerpt"]
    assert excerpt.startswith("ok[31mzzz") and len(excerpt.encode()) <= 1024
    assert "\x1b" not in excerpt and "\x00" not in excerpt


def test_slow_receivers_do_not_hold_up_file_validation(api: Api) -> None:
    """Senders have workers of their own: with two receivers each holding a sender for its whole deadline,
    another job's file is still validated at once, not after the deadlines."""
    with hostile(trickle) as (first_url, first_arrivals), hostile(trickle) as (second_url, second_arrivals):
        _endpoint(api, first_url)
        _endpoint(api, second_url)
        _failing_job(api)
        wait_until(lambda: first_arrivals and second_arrivals, 30, "both slow receivers to be called")
        event = api.http.get("/v1/events", params={"type": "fine_tuning.job.failed"}).json()["data"][0]

        second_job = _failing_job(api)
        failed = api.wait_status(second_job, {"failed", "succeeded", "cancelled"}, timeout=60)
        assert failed["error"]["code"] == "invalid_training_file"
        # Both attempts are still within their deadline: none has been recorded yet.
        in_flight = api.http.get(f"/v1/events/{event['id']}/deliveries").json()["data"]
        assert in_flight == [], in_flight
