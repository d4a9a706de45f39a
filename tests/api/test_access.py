"""Keys, scopes and tenants: 401 without a good key, 403 without the scope, 404 across tenants."""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import Api, wait_until
from tests.data import jsonl, sentiment_rows


def test_missing_and_wrong_keys_are_401(anon: Api, api_url: str) -> None:
    response = anon.http.get("/v1/files")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    wrong = Api(api_url, "sk-llmos-not-a-real-key")
    response = wrong.http.get("/v1/fine_tuning/jobs")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert "x-request-id" in response.headers


def test_revoked_key_is_401_within_the_auth_cache_time(api_url: str, services: dict[str, str]) -> None:
    from core.settings import get_settings
    from db import tenants
    from db.session import transaction
    from ops.bootstrap import create_key

    key_id, plaintext, _ = create_key("acme", ["files"])
    api = Api(api_url, plaintext)
    # Every API process caches the key once it has served it; a few requests reach each of them.
    for _ in range(8):
        assert api.http.get("/v1/files").status_code == 200
    with transaction() as session:
        assert tenants.revoke_key(session, key_id)
    wait_until(lambda: all(api.http.get("/v1/files").status_code == 401 for _ in range(8)),
               get_settings().auth_cache_seconds + 3, "the revoked key to be refused by every API process")


def test_missing_scope_is_403(api_url: str, make_key: Callable[..., str]) -> None:
    files_only = Api(api_url, make_key("acme", ["files"]))
    response = files_only.http.get("/v1/fine_tuning/jobs")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "missing_scope"
    assert files_only.http.get("/v1/files").status_code == 200


def test_other_tenants_ids_are_404(api_url: str, make_key: Callable[..., str]) -> None:
    alice = Api(api_url, make_key("alice"))
    bob = Api(api_url, make_key("bob"))
    file_id = alice.upload(jsonl(sentiment_rows(20))).json()["id"]
    job = alice.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id,
                                                        "hyperparameters": {"n_epochs": 1}}).json()
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content", f"/v1/fine_tuning/jobs/{job['id']}",
                 f"/v1/fine_tuning/jobs/{job['id']}/events"):
        assert bob.http.get(path).status_code == 404, path
    assert bob.http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 404
    assert bob.http.delete(f"/v1/files/{file_id}").status_code == 404
    # Bob cannot train on Alice's file either: to him it does not exist.
    response = bob.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id})
    assert response.status_code == 400 and response.json()["error"]["param"] == "training_file"
    assert bob.http.get("/v1/fine_tuning/jobs").json()["data"] == []
    alice.wait_status(job["id"], {"succeeded", "failed"})
