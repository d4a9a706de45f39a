"""Webhook signing secrets are sealed at rest, and the sealing key can be rotated."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select, text

from tests.conftest import Api


def test_the_database_holds_no_signing_secret_in_the_clear(api: Api) -> None:
    from db.models import TenantWebhookSecret, WebhookEndpoint
    from db.session import transaction

    created = api.http.post("/v1/webhook_endpoints", json={"url": "http://127.0.0.1:9/hook", "events": ["*"]})
    secret = created.json()["secret"]
    default = api.http.get("/v1/webhook_endpoints/default_secret").json()["secret"]
    assert secret.startswith("whsec_") and default.startswith("whsec_")
    with transaction() as session:
        stored = [session.scalars(select(WebhookEndpoint.secret)).one(),
                  session.scalars(select(TenantWebhookSecret.secret)).one()]
        dump = " ".join(str(v) for v in session.execute(text(
            "SELECT w.*, t.* FROM webhook_endpoints w, tenant_webhook_secrets t")).one())
    assert all(value.startswith("enc:v1:") for value in stored)
    assert secret not in dump and default not in dump
    # Rotating the endpoint's secret keeps both sealed.
    rotated = api.http.post(f"/v1/webhook_endpoints/{created.json()['id']}/rotate_secret").json()["secret"]
    with transaction() as session:
        now, before = session.execute(select(WebhookEndpoint.secret, WebhookEndpoint.previous_secret)).one()
    assert now.startswith("enc:v1:") and before == stored[0] and rotated not in now


@pytest.fixture
def key_setting(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    from core.settings import get_settings

    yield monkeypatch
    monkeypatch.undo()
    get_settings.cache_clear()


def _use_keys(monkeypatch: pytest.MonkeyPatch, keys: str) -> None:
    from core.settings import get_settings

    monkeypatch.setenv("LLMOS_SECRET_KEY", keys)
    get_settings.cache_clear()


def test_rotation_reseals_with_the_new_key(key_setting: pytest.MonkeyPatch, services: dict[str, str]) -> None:
    from core.sealing import SealError, seal, unseal
    from db.models import Tenant, TenantWebhookSecret
    from db.session import transaction
    from domain import webhooks

    old, new = "the-old-key-0123456789", "the-new-key-0123456789"
    _use_keys(key_setting, old)
    with transaction() as session:
        session.add(Tenant(id="tenant_rot", name="rotation"))
        session.flush()
        session.add(TenantWebhookSecret(tenant_id="tenant_rot", secret=seal("whsec_c2VjcmV0")))
        # A secret stored before sealing existed, in the clear.
        session.add(Tenant(id="tenant_plain", name="plain"))
        session.flush()
        session.add(TenantWebhookSecret(tenant_id="tenant_plain", secret="whsec_cGxhaW4="))
    _use_keys(key_setting, f"{new},{old}")  # the new key seals, both open
    with transaction() as session:
        assert webhooks.tenant_secret(session, "tenant_rot") == "whsec_c2VjcmV0"
        assert webhooks.reseal_secrets(session) == 2
    _use_keys(key_setting, new)  # the old key is gone: everything still opens
    with transaction() as session:
        assert webhooks.tenant_secret(session, "tenant_rot") == "whsec_c2VjcmV0"
        assert webhooks.tenant_secret(session, "tenant_plain") == "whsec_cGxhaW4="
        stored = session.get(TenantWebhookSecret, "tenant_plain")
        assert stored is not None and stored.secret.startswith("enc:v1:")
        sealed = stored.secret
    _use_keys(key_setting, old)
    with pytest.raises(SealError):
        unseal(sealed)
