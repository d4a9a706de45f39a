"""Idempotency keys: the first response to a keyed POST, kept for replay."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core.clock import utcnow
from db.models import IdempotencyKey

TTL = timedelta(hours=24)


def claim(session: Session, tenant_id: str, key: str, request_hash: str, method: str, path: str
          ) -> IdempotencyKey | None:
    """Reserve the key for this request; None when it is ours to run, else the earlier row (locked)."""
    now = utcnow()
    inserted = session.execute(
        insert(IdempotencyKey)
        .values(tenant_id=tenant_id, key=key, request_hash=request_hash, method=method, path=path,
                status="in_flight", created_at=now)
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.key)
    ).first()
    if inserted is not None:
        return None
    row = session.scalar(select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id,
                                                      IdempotencyKey.key == key).with_for_update())
    if row is None:
        return None
    if row.created_at < now - TTL:
        # Expired: the key is free again and this request becomes its first use.
        row.request_hash, row.method, row.path = request_hash, method, path
        row.status, row.created_at = "in_flight", now
        row.response_status = row.response_body = row.response_content_type = None
        return None
    return row


def finish(session: Session, tenant_id: str, key: str, status: int, body: bytes, content_type: str | None) -> None:
    row = session.get(IdempotencyKey, (tenant_id, key))
    if row is not None:
        row.status, row.response_status, row.response_body = "done", status, body
        row.response_content_type = content_type


def release(session: Session, tenant_id: str, key: str) -> None:
    """Forget a key whose request failed on our side, so a retry runs it again."""
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key))


def purge_expired(session: Session) -> int:
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - TTL))
    return int(getattr(result, "rowcount", 0) or 0)
