"""Batches end to end: the openai SDK, bad lines, cancel, expiry, a killed inference worker and webhooks.

The stack runs with LLMOS_BATCH_CHUNK_LINES=20 (tests/conftest.py), so a few dozen lines span chunks.
"""

from __future__ import annotations

import json
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from sqlalchemy import select

from tests.conftest import Api, Process, wait_until
from tests.data import jsonl, sentiment_rows
from tests.receiver import receiver

CHUNK = 20
FINAL = {"completed", "failed", "expired", "cancelled"}


def _client(api: Api, api_url: str) -> OpenAI:
    return OpenAI(base_url=f"{api_url}/v1", api_key=api.http.headers["authorization"].split()[-1])


def _line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _create(api: Api, lines: str, endpoint: str, **extra: Any) -> dict[str, Any]:
    file_id = api.upload(lines, purpose="batch", name="batch.jsonl").json()["id"]
    created = api.http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint,
                                                  "completion_window": "24h", **extra})
    assert created.status_code == 200, created.text
    body: dict[str, Any] = created.json()
    return body


def _batch(api: Api, batch_id: str) -> dict[str, Any]:
    response = api.http.get(f"/v1/batches/{batch_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _wait(api: Api, batch_id: str, statuses: set[str], timeout: float = 120) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        batch = _batch(api, batch_id)
        return batch if batch["status"] in statuses else None

    found: dict[str, Any] = wait_until(reached, timeout, f"batch {batch_id} to reach {statuses}", 0.1)
    return found


def _lines(api: Api, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    response = api.http.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def _chunks(batch_id: str) -> list[Any]:
    from db.models import BatchChunk
    from db.session import transaction

    with transaction() as session:
        rows = list(session.scalars(select(BatchChunk).where(BatchChunk.batch_id == batch_id)
                                    .order_by(BatchChunk.seq)))
        session.expunge_all()
    return rows


def _done_chunks(batch_id: str) -> int:
    return sum(c.status == "done" for c in _chunks(batch_id))


def _generation_lines(n: int, max_tokens: int = 24) -> str:
    """Completions on the base tiny-gpt2: no training needed, and slow enough per line to stop mid-batch."""
    return jsonl([_line(f"req-{i}", "/v1/completions",
                        {"model": "tiny-gpt2", "prompt": f"story number {i}", "max_tokens": max_tokens,
                         "temperature": 0}) for i in range(n)])


def _train_classifier(api: Api) -> str:
    file_id = api.upload(jsonl(sentiment_rows(80))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "seed": 7,
        "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate": 3e-3}}).json()
    done = api.wait_status(job["id"], {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["status"] == "succeeded", done["error"]
    model: str = done["fine_tuned_model"]
    return model


def _rounded(value: Any) -> Any:
    """Floats to 5 places: batching pads inputs differently, which moves scores in the last bits only."""
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def test_classification_batch_through_the_openai_sdk_matches_the_online_endpoint(api: Api, api_url: str) -> None:
    model = _train_classifier(api)
    client = _client(api, api_url)
    texts = [row["text"] for row in sentiment_rows(45, seed=3)]
    bodies: list[dict[str, Any]] = [
        {"model": model, "input": [text, texts[i - 1]] if i % 5 == 0 else text} for i, text in enumerate(texts)]
    content = jsonl([_line(f"row-{i}", "/v1/classifications", body) for i, body in enumerate(bodies)])
    uploaded = client.files.create(file=("batch.jsonl", content.encode()), purpose="batch")
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/classifications",  # type: ignore[arg-type]
                                    completion_window="24h", metadata={"pipeline": "nightly"})
    assert created.id.startswith("batch_") and created.status == "validating"
    assert created.expires_at is not None and created.expires_at - created.created_at == 24 * 3600

    wait_until(lambda: client.batches.retrieve(created.id).status in FINAL, 120, "the batch to finish")
    batch = client.batches.retrieve(created.id)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (45, 45, 0)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.error_file_id is None
    assert batch.metadata == {"pipeline": "nightly"}
    assert len(_chunks(batch.id)) == 3  # 45 lines in chunks of 20

    assert batch.output_file_id is not None
    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in output] == [f"row-{i}" for i in range(45)], "lines keep the input's order"
    for line, body in zip(output, bodies, strict=True):
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        online = api.http.post("/v1/classifications", json=body)
        assert online.status_code == 200, online.text
        assert _rounded(line["response"]["body"]) == _rounded(online.json())
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"

    listed = client.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id]
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/classifications",  # type: ignore[arg-type]
                              completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_bad_lines_land_in_the_error_file_with_their_line_numbers(api: Api) -> None:
    good = {"model": "tiny-gpt2", "prompt": "hello", "max_tokens": 2}
    lines = [
        json.dumps(_line("a", "/v1/completions", good)),                              # 1 ok
        json.dumps(_line("a", "/v1/completions", good)),                              # 2 duplicate custom_id
        json.dumps(_line("b", "/v1/chat/completions", good)),                         # 3 wrong url
        json.dumps(_line("c", "/v1/completions", {"model": "tiny-gpt2", "max_tokens": 0, "prompt": "x"})),  # 4
        json.dumps(_line("d", "/v1/completions", {**good, "model": "no-such-model"})),  # 5 unknown model
        '{"custom_id": "e", "method": "POST", ',                                      # 6 invalid JSON
        "",                                                                           # 7 blank: skipped
        json.dumps(_line("f", "/v1/completions", {**good, "model": "tiny-bert"})),    # 8 wrong kind of model
        json.dumps(_line("g", "/v1/completions", {**good, "prompt": ["one", "two"]})),  # 9 ok
    ]
    batch = _create(api, "\n".join(lines) + "\n", "/v1/completions")
    final = _wait(api, batch["id"], FINAL)
    assert final["status"] == "completed"
    assert final["request_counts"] == {"total": 8, "completed": 2, "failed": 6}
    output = _lines(api, final["output_file_id"])
    assert [o["custom_id"] for o in output] == ["a", "g"]
    assert len(output[1]["response"]["body"]["choices"]) == 2
    errors = _lines(api, final["error_file_id"])
    found = [(e["custom_id"], e["error"]["line"], e["error"]["code"]) for e in errors]
    assert found == [("a", 2, "duplicate_custom_id"), ("b", 3, "invalid_url"), ("c", 4, "invalid_request"),
                     ("d", 5, "model_not_found"), (None, 6, "invalid_json_line"), ("f", 8, "unsupported_task")]
    assert all(e["error"]["message"].startswith(f"line {e['error']['line']}: ") for e in errors)
    assert errors[2]["error"]["param"] == "body.max_tokens"

    all_bad = _create(api, "not json\n" + json.dumps(_line("x", "/v1/ner", good)) + "\n", "/v1/completions")
    failed = _wait(api, all_bad["id"], FINAL)
    assert failed["status"] == "failed" and failed["output_file_id"] is None
    assert failed["errors"]["object"] == "list"
    assert [(e["line"], e["code"]) for e in failed["errors"]["data"]] == [(1, "invalid_json_line"),
                                                                          (2, "invalid_url")]


def test_create_refuses_bad_requests_and_hides_other_tenants(api: Api, api_url: str, make_key: Any) -> None:
    fine_tune_file = api.upload(jsonl(sentiment_rows(4))).json()["id"]
    wrong_purpose = api.http.post("/v1/batches", json={"input_file_id": fine_tune_file, "endpoint": "/v1/ner",
                                                       "completion_window": "24h"})
    assert wrong_purpose.status_code == 400 and wrong_purpose.json()["error"]["param"] == "input_file_id"
    missing = api.http.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/ner",
                                                 "completion_window": "24h"})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "file_not_found"
    batch_file = api.upload("{}\n", purpose="batch").json()["id"]
    for field, value in (("endpoint", "/v1/moderations"), ("completion_window", "48h")):
        body = {"input_file_id": batch_file, "endpoint": "/v1/ner", "completion_window": "24h", field: value}
        refused = api.http.post("/v1/batches", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, refused.text
    batch = _create(api, "{}\n", "/v1/ner")
    other = Api(api_url, make_key(tenant="other"))
    assert other.http.get(f"/v1/batches/{batch['id']}").status_code == 404
    assert other.http.post(f"/v1/batches/{batch['id']}/cancel").status_code == 404
    assert other.http.get("/v1/batches").json()["data"] == []
    assert api.http.get("/v1/batches/batch_unknown").status_code == 404
    no_scope = Api(api_url, make_key(scopes=["files"]))
    assert no_scope.http.get("/v1/batches").status_code == 403
    second = _create(api, "{}\n", "/v1/ner")
    page = api.http.get("/v1/batches", params={"limit": 1}).json()
    assert [b["id"] for b in page["data"]] == [second["id"]] and page["has_more"] is True
    rest = api.http.get("/v1/batches", params={"limit": 1, "after": second["id"]}).json()
    assert [b["id"] for b in rest["data"]] == [batch["id"]] and rest["has_more"] is False


def _partial_output_is_consistent(api: Api, final: dict[str, Any], total: int) -> list[dict[str, Any]]:
    output = _lines(api, final["output_file_id"])
    counts = final["request_counts"]
    assert counts["total"] == total and counts["failed"] == 0
    assert 0 < counts["completed"] == len(output) < total, counts
    numbers = [int(o["custom_id"].split("-")[1]) for o in output]
    assert numbers == sorted(numbers), "partial output keeps the input's order"
    assert all(o["response"]["status_code"] == 200 for o in output)
    return output


def test_cancel_mid_run_keeps_the_answered_lines(api: Api, api_url: str) -> None:
    total = 200
    batch = _create(api, _generation_lines(total), "/v1/completions")
    wait_until(lambda: _done_chunks(batch["id"]) >= 1, 120, "the first chunk to finish")
    # The input of an unfinished batch cannot be deleted from under it.
    in_use = api.http.delete(f"/v1/files/{batch['input_file_id']}")
    assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "file_in_use", in_use.text
    cancelled = _client(api, api_url).batches.cancel(batch["id"])
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at is not None
    final = _wait(api, batch["id"], FINAL)
    assert final["status"] == "cancelled" and final["cancelled_at"] is not None
    _partial_output_is_consistent(api, final, total)
    assert any(c.status == "pending" for c in _chunks(batch["id"])), "chunks after the cancel never ran"


def test_an_overdue_batch_expires_with_its_partial_output(api: Api) -> None:
    from core.clock import utcnow
    from db.models import Batch
    from db.session import transaction

    total = 200
    batch = _create(api, _generation_lines(total), "/v1/completions")
    wait_until(lambda: _done_chunks(batch["id"]) >= 1, 120, "the first chunk to finish")
    with transaction() as session:
        row = session.get(Batch, batch["id"])
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
    final = _wait(api, batch["id"], FINAL, timeout=60)  # beat's reconciler runs every second in tests
    assert final["status"] == "expired" and final["expired_at"] is not None
    _partial_output_is_consistent(api, final, total)


def test_a_validation_that_keeps_crashing_fails_the_batch_after_the_attempt_cap(api: Api, tmp_path: Path) -> None:
    from core.settings import get_settings
    from db.models import Batch, File
    from db.session import transaction

    file_id = api.upload(jsonl([_line("a", "/v1/completions", {"model": "tiny-gpt2", "prompt": "hi"})]),
                         purpose="batch", name="batch.jsonl").json()["id"]
    with transaction() as session:
        row = session.get(File, file_id)
        assert row is not None
        # Reading a directory raises what validation does not expect: every run crashes, as a bug would.
        row.path = str(tmp_path)
    created = api.http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                 "completion_window": "24h"})
    assert created.status_code == 200, created.text
    # Each crash leaves the batch silent; the reconciler resends it after the stale period, then gives up.
    final = _wait(api, created.json()["id"], FINAL, timeout=120)
    cap = get_settings().max_attempts
    assert final["status"] == "failed" and final["failed_at"] is not None
    (error,) = final["errors"]["data"]
    assert error["code"] == "worker_lost" and f"giving up after {cap} attempts" in error["message"]
    with transaction() as session:
        batch = session.get(Batch, final["id"])
        assert batch is not None and batch.validation_attempts == cap


def test_a_killed_inference_worker_redoes_only_the_chunk_it_was_running(api: Api, stack: dict[str, Process]) -> None:
    total = 120
    batch = _create(api, _generation_lines(total), "/v1/completions")

    def one_done_one_running() -> bool:
        chunks = _chunks(batch["id"])
        return any(c.status == "done" for c in chunks) and any(c.status == "running" for c in chunks)

    wait_until(one_done_one_running, 120, "a chunk done and the next one running")
    worker = stack["worker-inference"].popen
    os.killpg(worker.pid, signal.SIGKILL)  # a crash: no warning, no cleanup
    worker.wait(30)
    before = {c.seq: (c.attempts, c.finished_at) for c in _chunks(batch["id"]) if c.status == "done"}
    stack["worker-inference"] = stack["worker-inference"].respawn("worker-inference-batches")

    final = _wait(api, batch["id"], FINAL, timeout=180)
    assert final["status"] == "completed", final
    assert final["request_counts"] == {"total": total, "completed": total, "failed": 0}
    output = _lines(api, final["output_file_id"])
    assert [o["custom_id"] for o in output] == [f"req-{i}" for i in range(total)]
    after = {c.seq: (c.attempts, c.finished_at) for c in _chunks(batch["id"])}
    assert before, "at least one chunk finished before the kill"
    for seq, record in before.items():
        assert after[seq] == record, f"chunk {seq} finished before the kill and must not run again"
    assert record[0] == 1
    assert any(attempts == 2 for attempts, _ in after.values()), "the chunk that was running ran again"


def test_batch_events_reach_the_batch_webhook_url(api: Api) -> None:
    import standardwebhooks

    with receiver() as rx:
        good = {"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 2}
        batch = _create(api, jsonl([_line("one", "/v1/completions", good)]), "/v1/completions",
                        webhook_url=rx.url)
        assert _wait(api, batch["id"], FINAL)["status"] == "completed"
        wait_until(lambda: "batch.completed" in rx.types(), 30, "the completed event to arrive")
        secret = api.http.get("/v1/webhook_endpoints/default_secret").json()["secret"]
        payloads = [standardwebhooks.Webhook(secret).verify(item.body, item.headers) for item in rx.received]
        assert [p["type"] for p in payloads] == ["batch.in_progress", "batch.completed"]
        assert payloads[-1]["data"]["id"] == batch["id"]
        assert payloads[-1]["data"]["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
        assert payloads[-1]["data"]["output_file_id"] is not None
        logged = api.http.get("/v1/events", params={"type": "batch.completed"}).json()["data"]
        assert [e["data"]["id"] for e in logged] == [batch["id"]]
