"""Files and training-file validation: clear errors naming the field and line at fault."""

from __future__ import annotations

import json
from collections.abc import Iterator

from tests.conftest import Api
from tests.data import jsonl, sentiment_rows


def test_upload_get_content_delete(api: Api) -> None:
    content = jsonl(sentiment_rows(10))
    created = api.upload(content, name="reviews.jsonl")
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert body["bytes"] == len(content.encode()) and body["filename"] == "reviews.jsonl"
    assert body["purpose"] == "fine-tune" and body["status_details"] is None
    assert api.http.get(f"/v1/files/{body['id']}").json() == body
    assert api.http.get(f"/v1/files/{body['id']}/content").text == content
    deleted = api.http.delete(f"/v1/files/{body['id']}")
    assert deleted.json() == {"id": body["id"], "object": "file", "deleted": True}
    assert api.http.get(f"/v1/files/{body['id']}").status_code == 404


def test_upload_rejects_bad_purpose_encoding_and_empty(api: Api) -> None:
    response = api.upload("x\n", purpose="nonsense")
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"
    response = api.upload(b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    assert response.status_code == 400
    assert "line 2" in response.json()["error"]["message"]
    assert api.upload(b"").status_code == 400


def test_bad_training_file_fails_validation_naming_the_line(api: Api) -> None:
    rows = [json.dumps(r) for r in sentiment_rows(6)]
    rows.insert(2, '{"text": "", "label": "pos"}')
    rows.insert(4, '{"text": "no label here"}')
    rows.insert(5, "not json at all")
    file_id = api.upload("\n".join(rows) + "\n").json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id,
                                                      "task": "classification"}).json()
    final = api.wait_status(job["id"], {"failed", "succeeded"}, timeout=60)
    assert final["status"] == "failed"
    assert final["error"]["code"] == "invalid_training_file"
    message = final["error"]["message"]
    assert "line 6" in message, message  # the non-JSON line is reported first: the file cannot be read
    assert final["attempts"] == 0 and final["fine_tuned_model"] is None


def test_field_errors_on_job_create(api: Api) -> None:
    file_id = api.upload(jsonl(sentiment_rows(10))).json()["id"]
    cases = [
        ({"model": "no-such-model", "training_file": file_id}, "model"),
        ({"model": "tiny-bert", "training_file": "file-missing"}, "training_file"),
        ({"model": "tiny-bert", "training_file": file_id, "hyperparameters": {"n_epochs": 0}},
         "hyperparameters.n_epochs"),
        # Training's own limits, refused at creation instead of failing the job later (one definition).
        ({"model": "tiny-bert", "training_file": file_id, "hyperparameters": {"warmup_ratio": 0.7}},
         "hyperparameters.warmup_ratio"),
        ({"model": "tiny-bert", "training_file": file_id, "hyperparameters": {"learning_rate": 5}},
         "hyperparameters.learning_rate"),
        ({"model": "tiny-bert", "training_file": file_id, "task": "generation"}, "task"),
        ({"model": "tiny-bert", "training_file": file_id, "bogus": 1}, "bogus"),
        ({"model": "tiny-bert", "training_file": file_id, "suffix": "has spaces"}, "suffix"),
        ({"model": "tiny-bert", "training_file": file_id, "suffix": "Upper"}, "suffix"),
        ({"model": "tiny-bert", "training_file": file_id, "suffix": "a:b"}, "suffix"),
        ({"model": "tiny-bert", "training_file": file_id, "suffix": "x" * 65}, "suffix"),
        ({"model": "tiny-bert", "training_file": file_id, "compute": {"processes": 0}}, "compute.processes"),
        ({"model": "tiny-bert", "training_file": file_id, "compute": {"gpus": 2}}, "compute.gpus"),
    ]
    for body, param in cases:
        response = api.http.post("/v1/fine_tuning/jobs", json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (body, error)
    response = api.http.post("/v1/fine_tuning/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400


def test_size_cap_is_413_and_keeps_nothing(api: Api, services: dict[str, str]) -> None:
    from pathlib import Path

    from core.settings import get_settings

    def stored() -> set[Path]:
        return {p for p in Path(services["home"], "files").rglob("*") if p.is_file()}

    before = stored()
    cap = get_settings().max_upload_bytes
    line = '{"text": "padding padding padding padding", "label": "pos"}\n'
    # Just over the cap: read, counted and refused while streaming to disk.
    slightly = line * (cap // len(line) + 2)
    # Far over the cap: refused from Content-Length before the body is read.
    far = line * (3 * cap // len(line))
    for body in (slightly, far):
        response = api.upload(body)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] in ("file_too_large", "request_too_large")
    assert api.http.get("/v1/files").json()["data"] == []
    assert stored() == before


def test_nul_characters_are_bad_input_not_a_crash(api: Api) -> None:
    assert api.http.get("/v1/fine_tuning/jobs", params={"status": "a\x00b"}).status_code == 400
    file_id = api.upload(jsonl(sentiment_rows(4))).json()["id"]
    response = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id,
                                                           "metadata": {"k": "v\x00"}})
    assert response.status_code == 400 and "NUL" in response.json()["error"]["message"]


def _chunked(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body httpx sends chunked, without Content-Length, as a client that streams would."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


def test_chunked_bodies_meet_the_caps_on_the_bytes_received(api: Api, services: dict[str, str]) -> None:
    from pathlib import Path

    from core.settings import get_settings

    def stored() -> set[Path]:
        return {p for p in Path(services["home"], "files").rglob("*") if p.is_file()}

    before = stored()
    cap = get_settings().max_upload_bytes
    boundary = "llmosboundary"
    upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
              f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
              "Content-Type: application/octet-stream\r\n\r\n").encode()
    upload += b'{"text": "x", "label": "y"}\n' * (2 * cap // 28) + f"\r\n--{boundary}--\r\n".encode()
    response = api.http.post("/v1/files", content=_chunked(upload),
                             headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert api.http.get("/v1/files").json()["data"] == [] and stored() == before

    # A JSON body past 8 MiB, chunked: refused while it arrives, never parsed.
    huge = b'{"model": "tiny-bert", "training_file": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    response = api.http.post("/v1/fine_tuning/jobs", content=_chunked(huge),
                             headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"


def test_a_body_without_a_valid_key_is_refused_before_it_is_read(anon: Api, api_url: str) -> None:
    from core.settings import get_settings

    # Larger than the cap and chunked: a server that read it before checking the key would answer 413.
    body = b"a" * (2 * get_settings().max_upload_bytes)
    for client in (anon, Api(api_url, "sk-llmos-not-a-real-key")):
        response = client.http.post("/v1/files", content=_chunked(body),
                                    headers={"content-type": "multipart/form-data; boundary=x"})
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "authentication_error"
    # Public routes and bodiless requests are untouched by the check.
    assert anon.http.get("/healthz").status_code == 200
    assert anon.http.get("/v1/files").status_code == 401
