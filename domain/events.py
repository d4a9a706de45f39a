"""The durable outbox: every state change writes its event in the same transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core import ids
from core.clock import unix, utcnow
from core.errors import not_found
from db import webhooks as webhooks_repo
from db.models import DeliveryAttempt, OutboxEvent, WebhookDelivery
from domain.listing import page


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


# --------------------------------------------------------------------------------------------------------
# The events service: the tenant's log for clients that poll, delivery attempts and redelivery.
# --------------------------------------------------------------------------------------------------------


def _event(session: Session, tenant_id: str, event_id: str) -> OutboxEvent:
    row = webhooks_repo.get_event(session, tenant_id, event_id)
    if row is None:
        raise not_found("event", event_id)
    return row


def list_events(session: Session, *, tenant_id: str, type_: str | None, after: str | None,
                limit: int) -> dict[str, Any]:
    return page(webhooks_repo.list_events(session, tenant_id, type_, after, limit), event_object, after)


def get_event(session: Session, *, tenant_id: str, event_id: str) -> dict[str, Any]:
    return event_object(_event(session, tenant_id, event_id))


def attempt_object(row: DeliveryAttempt) -> dict[str, Any]:
    return {"object": "webhook.delivery_attempt", "endpoint": row.endpoint_id, "url": row.url,
            "attempt": row.attempt, "status_code": row.status_code, "duration_ms": row.duration_ms,
            "response_excerpt": row.response_excerpt, "error": row.error, "created_at": unix(row.created_at)}


def list_deliveries(session: Session, *, tenant_id: str, event_id: str) -> dict[str, Any]:
    event = _event(session, tenant_id, event_id)
    rows = webhooks_repo.delivery_attempts(session, event.id)
    return {"object": "list", "data": [attempt_object(r) for r in rows], "has_more": False}


def redeliver(session: Session, *, tenant_id: str, event_id: str) -> dict[str, Any]:
    """Send the event again, with the same `webhook-id`, to every destination it was meant for."""
    from domain import dispatch
    from domain.webhooks import TASK_FLUSH

    event = _event(session, tenant_id, event_id)
    earlier = webhooks_repo.destinations(session, event.id)
    now = utcnow()
    for endpoint_id, destination, url in earlier:
        session.add(WebhookDelivery(event_id=event.id, event_seq=event.seq, tenant_id=event.tenant_id,
                                    endpoint_id=endpoint_id, destination=destination, url=url, status="pending",
                                    attempts=0, next_attempt_at=now, created_at=now, updated_at=now))
        dispatch.enqueue_after_commit(session, TASK_FLUSH, destination, queue=dispatch.QUEUE_WEBHOOKS)
    return {**event_object(event), "redelivered_to": len(earlier)}
