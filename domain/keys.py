"""The keys service: tenants are created by their first key; keys are shown once and stored hashed."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from db import tenants as tenants_repo


def create_key(session: Session, *, tenant: str, scopes: list[str]) -> dict[str, Any]:
    """A new key for ``tenant`` (created on first use): ``{"id", "key", "tenant", "scopes"}``, the key in plain."""
    row, plaintext = tenants_repo.create_key(session, tenants_repo.get_or_create_tenant(session, tenant), scopes)
    return {"id": row.id, "key": plaintext, "tenant": tenant, "scopes": list(row.scopes)}


def list_keys(session: Session) -> list[dict[str, Any]]:
    return [{"id": key.id, "tenant": tenant.name, "prefix": key.prefix, "scopes": list(key.scopes),
             "revoked": key.revoked_at is not None} for key, tenant in tenants_repo.list_keys(session)]


def revoke_key(session: Session, *, key_id: str) -> bool:
    """False when there is no active key with this ID."""
    return tenants_repo.revoke_key(session, key_id)


def tenant_has_keys(session: Session, *, tenant: str) -> bool:
    return tenants_repo.has_keys(session, tenants_repo.get_or_create_tenant(session, tenant).id)
