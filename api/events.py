"""The tenant's event log (for clients that poll), delivery attempts and redelivery."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import Principal, get_session, require
from api.errors import not_found
from api.pages import After, Limit, page_body
from db.models import DeliveryAttempt, OutboxEvent, WebhookDelivery
from db.pagination import newest_first
from domain import dispatch, webhooks
from domain.clock import unix, utcnow
from domain.events import event_object

router = APIRouter(prefix="/v1/events", tags=["events"])
scope = require("webhooks")


def _event(session: Session, principal: Principal, event_id: str) -> OutboxEvent:
    row = session.scalar(select(OutboxEvent).where(OutboxEvent.id == event_id,
                                                   OutboxEvent.tenant_id == principal.tenant_id))
    if row is None:
        raise not_found("event", event_id)
    return row


@router.get("", summary="List the tenant's events, newest first")
def list_events(type: str | None = Query(None, max_length=64), limit: int = Limit, after: str | None = After,
                principal: Principal = Depends(scope), session: Session = Depends(get_session)) -> dict[str, Any]:
    stmt = select(OutboxEvent).where(OutboxEvent.tenant_id == principal.tenant_id)
    if type:
        stmt = stmt.where(OutboxEvent.type == type)
    page = newest_first(session, stmt, OutboxEvent.seq, OutboxEvent.seq, OutboxEvent.id, after, limit)
    return page_body(page, event_object, after)


@router.get("/{event_id}", summary="Retrieve an event")
def get_event(event_id: str, principal: Principal = Depends(scope),
              session: Session = Depends(get_session)) -> dict[str, Any]:
    return event_object(_event(session, principal, event_id))


def attempt_object(row: DeliveryAttempt) -> dict[str, Any]:
    return {"object": "webhook.delivery_attempt", "endpoint": row.endpoint_id, "url": row.url,
            "attempt": row.attempt, "status_code": row.status_code, "duration_ms": row.duration_ms,
            "response_excerpt": row.response_excerpt, "error": row.error, "created_at": unix(row.created_at)}


@router.get("/{event_id}/deliveries", summary="Every delivery attempt of an event")
def list_deliveries(event_id: str, principal: Principal = Depends(scope),
                    session: Session = Depends(get_session)) -> dict[str, Any]:
    event = _event(session, principal, event_id)
    rows = session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.event_id == event.id)
                           .order_by(DeliveryAttempt.id.desc())).all()
    return {"object": "list", "data": [attempt_object(r) for r in rows], "has_more": False}


@router.post("/{event_id}/redeliver", summary="Send the event again to every destination it was meant for")
def redeliver(event_id: str, principal: Principal = Depends(scope),
              session: Session = Depends(get_session)) -> dict[str, Any]:
    event = _event(session, principal, event_id)
    earlier = session.execute(select(WebhookDelivery.endpoint_id, WebhookDelivery.destination, WebhookDelivery.url)
                              .where(WebhookDelivery.event_id == event.id).distinct()).all()
    now = utcnow()
    for endpoint_id, destination, url in earlier:
        session.add(WebhookDelivery(event_id=event.id, event_seq=event.seq, tenant_id=event.tenant_id,
                                    endpoint_id=endpoint_id, destination=destination, url=url, status="pending",
                                    attempts=0, next_attempt_at=now, created_at=now, updated_at=now))
        dispatch.enqueue_after_commit(session, webhooks.TASK_FLUSH, destination, queue=dispatch.QUEUE_CPU)
    session.commit()
    return {**event_object(event), "redelivered_to": len(earlier)}
