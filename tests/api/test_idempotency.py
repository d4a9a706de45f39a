"""Idempotency-Key with Stripe's semantics: replay, conflict on a different body, concurrent duplicates."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from sqlalchemy import func, select

from tests.conftest import Api
from tests.data import jsonl, sentiment_rows


def _job_body(api: Api) -> dict[str, Any]:
    file_id = api.upload(jsonl(sentiment_rows(10))).json()["id"]
    return {"model": "tiny-bert", "training_file": file_id, "hyperparameters": {"n_epochs": 1}}


def _jobs_in_db() -> int:
    from db.models import FineTuningJob
    from db.session import transaction

    with transaction() as session:
        return int(session.scalar(select(func.count()).select_from(FineTuningJob)) or 0)


def test_replay_returns_the_first_response(api: Api, api_url: str, make_key: Any) -> None:
    body = _job_body(api)
    first = api.http.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "create-1"})
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    # Same JSON with other key order and spacing is the same request.
    reordered = httpx.Request("POST", "/", json=dict(reversed(list(body.items())))).content
    again = api.http.post("/v1/fine_tuning/jobs", content=reordered,
                          headers={"Idempotency-Key": "create-1", "content-type": "application/json"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert _jobs_in_db() == 1

    changed = api.http.post("/v1/fine_tuning/jobs", json={**body, "suffix": "other"},
                            headers={"Idempotency-Key": "create-1"})
    assert changed.status_code == 422 and changed.json()["error"]["code"] == "idempotency_key_reused"

    # Keys are per tenant: another tenant's identical key is a fresh request.
    other = Api(api_url, make_key("other-tenant"))
    response = other.http.post("/v1/fine_tuning/jobs", json=_job_body(other), headers={"Idempotency-Key": "create-1"})
    assert response.status_code == 200 and "idempotent-replayed" not in response.headers
    assert _jobs_in_db() == 2


def test_errors_are_replayed_too_but_not_5xx(api: Api) -> None:
    bad = {"model": "no-such-model", "training_file": "file-x"}
    first = api.http.post("/v1/fine_tuning/jobs", json=bad, headers={"Idempotency-Key": "bad-1"})
    second = api.http.post("/v1/fine_tuning/jobs", json=bad, headers={"Idempotency-Key": "bad-1"})
    assert first.status_code == second.status_code == 400
    assert second.headers["idempotent-replayed"] == "true" and second.json() == first.json()


def test_concurrent_duplicates_create_one_job(api: Api) -> None:
    body = _job_body(api)

    def post(_: int) -> httpx.Response:
        return api.http.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "burst"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 409}, statuses
    originals = [r for r in responses if r.status_code == 200 and "idempotent-replayed" not in r.headers]
    assert len(originals) == 1
    assert all(r.json()["id"] == originals[0].json()["id"] for r in responses if r.status_code == 200)
    assert all(r.json()["error"]["code"] == "idempotency_key_in_use" for r in responses if r.status_code == 409)
    assert _jobs_in_db() == 1


def test_keyed_upload_is_stored_once(api: Api) -> None:
    content = jsonl(sentiment_rows(6)).encode()

    def upload() -> httpx.Response:
        return api.http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("a.jsonl", content)},
                             headers={"Idempotency-Key": "upload-1"})

    first, second = upload(), upload()
    assert first.status_code == 200, first.text
    assert second.headers["idempotent-replayed"] == "true" and second.json()["id"] == first.json()["id"]
    assert [f["id"] for f in api.http.get("/v1/files").json()["data"]] == [first.json()["id"]]


def test_the_streamed_fingerprint_is_the_whole_bodys_in_any_chunking() -> None:
    """The fingerprint is computed as the body streams by; wherever the chunks break (boundaries split across
    them included), it is the one the whole body gives, so stored keys keep matching."""
    import random

    from api.idempotency import BodyDigest

    def _request_hash(method: str, path: str, body: bytes, content_type: str) -> str:
        digest = BodyDigest(method, path, content_type)
        digest.update(body)
        return digest.hexdigest()

    rng = random.Random(3)
    boundary = "----llmos" + "x" * 20
    for content_type, body in (
        (f"multipart/form-data; boundary={boundary}",
         b"".join(f"--{boundary}\r\nfield {i}\r\n{'y' * rng.randint(0, 90)}\r\n".encode() for i in range(40))
         + f"--{boundary}--\r\n".encode()),
        ("application/json", b'{"b": 1,   "a": [1, 2]}'),
        ("application/octet-stream", bytes(rng.randrange(256) for _ in range(5000))),
    ):
        whole = _request_hash("POST", "/v1/files", body, content_type)
        for _ in range(50):
            digest = BodyDigest("POST", "/v1/files", content_type)
            position = 0
            while position < len(body):
                step = rng.randint(1, 60)
                digest.update(body[position:position + step])
                position += step
            assert digest.hexdigest() == whole
    # Boundaries do not count; content does.
    other = "----other" + "z" * 20
    assert _request_hash("POST", "/p", f"--{boundary}\r\nA\r\n".encode(), f"multipart/form-data; boundary={boundary}") \
        == _request_hash("POST", "/p", f"--{other}\r\nA\r\n".encode(), f"multipart/form-data; boundary={other}")
    assert _request_hash("POST", "/p", b'{"a":1,"b":2}', "application/json") \
        == _request_hash("POST", "/p", b'{ "b": 2, "a": 1 }', "application/json")
