"""The keys service: tenants are created by their first key; keys are shown once and stored hashed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from core.clock import unix
from db import tenants as tenants_repo
from domain import audit


def create_key(session: Session, *, tenant: str, scopes: list[str], expires_at: datetime | None = None,
               actor: str = "system") -> dict[str, Any]:
    """A new key for ``tenant`` (created on first use): ``{"id", "key", "tenant", "scopes", "expires_at"}``, the
    key in plain."""
    row, plaintext = tenants_repo.create_key(session, tenants_repo.get_or_create_tenant(session, tenant), scopes,
                                             expires_at)
    audit.record(session, actor=actor, action="key.created", target=row.id,
                 details={"tenant": tenant, "scopes": list(row.scopes), "expires_at": unix(expires_at)})
    return {"id": row.id, "key": plaintext, "tenant": tenant, "scopes": list(row.scopes),
            "expires_at": unix(expires_at)}


def list_keys(session: Session) -> list[dict[str, Any]]:
    return [{"id": key.id, "tenant": tenant.name, "prefix": key.prefix, "scopes": list(key.scopes),
             "revoked": key.revoked_at is not None, "expires_at": unix(key.expires_at),
             "last_used_at": unix(key.last_used_at)} for key, tenant in tenants_repo.list_keys(session)]


def revoke_key(session: Session, *, key_id: str, actor: str = "system") -> bool:
    """False when there is no active key with this ID."""
    revoked = tenants_repo.revoke_key(session, key_id)
    if revoked:
        audit.record(session, actor=actor, action="key.revoked", target=key_id)
    return revoked


def tenant_has_keys(session: Session, *, tenant: str) -> bool:
    return tenants_repo.has_keys(session, tenants_repo.get_or_create_tenant(session, tenant).id)
