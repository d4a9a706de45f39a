"""Keys expire, record their use, and every administrative action lands in the audit log."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from typing import Any

from tests.conftest import ROOT, Api, wait_until


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def _key(tenant: str, expires_in: timedelta) -> str:
    from core.clock import utcnow
    from db.session import transaction
    from domain import keys

    with transaction() as session:
        created = keys.create_key(session, tenant=tenant, scopes=["files"], expires_at=utcnow() + expires_in)
    return str(created["key"])


def _last_used(key_id: str) -> int | None:
    from db.session import transaction
    from domain import keys

    with transaction() as session:
        found: int | None = next(k for k in keys.list_keys(session) if k["id"] == key_id)["last_used_at"]
    return found


def test_an_expired_key_is_refused_even_while_cached(api_url: str) -> None:
    assert Api(api_url, _key("acme", timedelta(seconds=-1))).http.get("/v1/files").status_code == 401
    soon = Api(api_url, _key("acme", timedelta(seconds=3)))
    assert soon.http.get("/v1/files").status_code == 200  # now cached by the API process
    refused = wait_until(lambda: (r := soon.http.get("/v1/files")).status_code == 401 and r, 15,
                         "the key to expire")
    assert refused.json()["error"]["code"] == "invalid_api_key"


def test_keys_record_their_use_and_admin_actions_are_audited(api_url: str, make_key: Any) -> None:
    created = _cli("keys", "create", "--tenant", "audited", "--scope", "files", "--expires-in", "90d", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["expires_at"] is not None
    assert _last_used(key["id"]) is None
    assert Api(api_url, key["key"]).http.get("/v1/files").status_code == 200
    assert _last_used(key["id"]) is not None
    listed = next(row for row in _cli("keys", "list").stdout.splitlines() if row.startswith(key["id"]))
    assert " active " in listed and "files" in listed
    assert _cli("tenants", "set", "audited", "--rpm", "100").returncode == 0
    assert _cli("keys", "revoke", key["id"]).returncode == 0
    assert _cli("keys", "create", "--tenant", "x", "--expires-in", "soon").returncode != 0

    entries = json.loads(_cli("audit", "--json").stdout)
    actions = [(e["action"], e["target"]) for e in entries]
    assert actions[:3] == [("key.revoked", key["id"]), ("tenant.limits_set", "audited"),
                           ("key.created", key["id"])]
    assert all(e["actor"].startswith("cli:") for e in entries[:3])
    assert entries[1]["details"] == {"rpm": 100}
    assert "key.revoked" in _cli("audit").stdout
