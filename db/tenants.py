"""Tenants and their API keys."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from core import ids
from core.clock import utcnow
from db.models import ApiKey, AuditEntry, Batch, File, FineTuningJob, Tenant, WebhookEndpoint

KEY_PREFIX = "sk-llmos-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=ids.new_id(ids.TENANT), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant: Tenant, scopes: list[str],
               expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """Create a key; the plaintext is returned once and only its hash is stored."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(24)
    row = ApiKey(
        id=ids.new_id(ids.KEY), tenant_id=tenant.id, key_hash=hash_key(plaintext),
        prefix=plaintext[: len(KEY_PREFIX) + 4], scopes=sorted(set(scopes)), expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, plaintext


@dataclass(frozen=True)
class ActiveKey:
    key_id: str
    scopes: list[str]
    tenant_id: str
    tenant_name: str
    # The tenant's own rate limits (None: the setting's default), cached with the key.
    rpm: int | None
    tpm: int | None
    expires_at: datetime | None


# Every request whose key is not cached runs this: plain columns, compiled once, no ORM identity map or
# entity loading, on an autocommit connection, so no BEGIN/ROLLBACK round trip wraps it either. It is an
# UPDATE so that the same round trip records the key's use (`last_used_at`, as fresh as the auth cache).
_ACTIVE_KEY = (
    update(ApiKey)
    .where(ApiKey.key_hash == bindparam("digest"), ApiKey.revoked_at.is_(None),
           or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > func.now()), Tenant.id == ApiKey.tenant_id)
    .values(last_used_at=func.now())
    .returning(ApiKey.id, ApiKey.scopes, Tenant.id, Tenant.name, Tenant.rpm, Tenant.tpm, ApiKey.expires_at)
)


def find_active_key(conn: Connection, key_hash: str) -> ActiveKey | None:
    """The unrevoked, unexpired key with this hash (`hash_key` of its plaintext), and its tenant; marks it used."""
    row = conn.execute(_ACTIVE_KEY, {"digest": key_hash}).first()
    return None if row is None else ActiveKey(*row)


def has_keys(session: Session, tenant_id: str) -> bool:
    return session.scalar(select(ApiKey.id).where(ApiKey.tenant_id == tenant_id).limit(1)) is not None


def list_keys(session: Session) -> list[tuple[ApiKey, Tenant]]:
    rows = session.execute(
        select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.created_at)
    ).all()
    return [(r[0], r[1]) for r in rows]


def revoke_key(session: Session, key_id: str) -> bool:
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True


def get_tenant(session: Session, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.name)))


def lock_tenant(session: Session, tenant_id: str) -> Tenant:
    """The tenant row, locked until the transaction ends: quota checks of one tenant run one at a time."""
    # key_share: FOR NO KEY UPDATE (see `domain.quotas.take`).
    tenant = session.scalar(select(Tenant).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    assert tenant is not None, tenant_id
    return tenant


def _count(session: Session, rows: Select[Any], up_to: int | None) -> int:
    """How many rows ``rows`` selects; with ``up_to``, at most that many are read (a quota needs to know only
    whether one more fits, which must not cost a scan of every active job of a tenant without a quota)."""
    if up_to is not None:
        rows = rows.limit(up_to)
    return int(session.scalar(select(func.count()).select_from(rows.subquery())) or 0)


def count_jobs(session: Session, tenant_id: str, statuses: Collection[str], *, up_to: int | None = None) -> int:
    return _count(session, select(FineTuningJob.id).where(
        FineTuningJob.tenant_id == tenant_id, FineTuningJob.status.in_(statuses)), up_to)


def count_batches(session: Session, tenant_id: str, statuses: Collection[str], *, up_to: int | None = None) -> int:
    return _count(session, select(Batch.id).where(Batch.tenant_id == tenant_id, Batch.status.in_(statuses)), up_to)


def count_webhook_endpoints(session: Session, tenant_id: str) -> int:
    return int(session.scalar(select(func.count()).select_from(WebhookEndpoint).where(
        WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.deleted_at.is_(None))) or 0)


def stored_bytes(session: Session, tenant_id: str) -> int:
    return int(session.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(
        File.tenant_id == tenant_id, File.deleted_at.is_(None))) or 0)


def record_audit(session: Session, actor: str, action: str, target: str | None, details: dict[str, Any] | None) -> None:
    session.add(AuditEntry(created_at=utcnow(), actor=actor, action=action, target=target, details=details))


def audit_entries(session: Session, limit: int) -> list[AuditEntry]:
    return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)))
