"""The durable outbox: every state change writes its event in the same transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from db.models import OutboxEvent
from domain import ids
from domain.clock import unix, utcnow


def emit_event(session: Session, tenant_id: str, type_: str, data: dict[str, Any]) -> OutboxEvent:
    """Add an outbox event; it commits (or not) with the change it describes."""
    now = utcnow()
    row = OutboxEvent(id=ids.new_id(ids.EVENT), tenant_id=tenant_id, type=type_, data=data, created_at=now)
    session.add(row)
    session.flush()  # assigns seq, which orders deliveries per destination
    from domain.webhooks import fan_out

    fan_out(session, row)
    return row


def event_object(row: OutboxEvent) -> dict[str, Any]:
    return {"id": row.id, "object": "event", "created_at": unix(row.created_at), "type": row.type,
            "data": row.data}
