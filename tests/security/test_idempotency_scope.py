"""An idempotent replay never hands one key's response to another key of the same tenant."""

from __future__ import annotations

from typing import Any

from tests.conftest import Api


def test_a_key_without_the_scope_cannot_replay_a_webhook_secret(api_url: str, make_key: Any) -> None:
    owner = Api(api_url, make_key("acme", ["webhooks"]))
    files_only = Api(api_url, make_key("acme", ["files"]))
    body = {"url": "http://127.0.0.1:9/hook", "events": ["*"]}
    created = owner.http.post("/v1/webhook_endpoints", json=body, headers={"Idempotency-Key": "hook-1"})
    assert created.status_code == 200 and created.json()["secret"].startswith("whsec_")
    # The same key and body from the owner replays…
    again = owner.http.post("/v1/webhook_endpoints", json=body, headers={"Idempotency-Key": "hook-1"})
    assert again.headers.get("idempotent-replayed") == "true" and again.json() == created.json()
    # …but from a key of the same tenant without the scope it is a request of its own, refused by the route.
    replay = files_only.http.post("/v1/webhook_endpoints", json=body, headers={"Idempotency-Key": "hook-1"})
    assert replay.status_code == 403, replay.text
    assert "whsec_" not in replay.text and "idempotent-replayed" not in replay.headers
