"""Webhook endpoints, outbox events and their deliveries."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import case, delete, func, select
from sqlalchemy.orm import Session

from db.models import DeliveryAttempt, OutboxEvent, WebhookDelivery, WebhookEndpoint
from db.pagination import Page, newest_first


def get_endpoint(session: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpoint | None:
    return session.scalar(select(WebhookEndpoint).where(
        WebhookEndpoint.id == endpoint_id, WebhookEndpoint.tenant_id == tenant_id,
        WebhookEndpoint.deleted_at.is_(None)))


def list_endpoints(session: Session, tenant_id: str, after: str | None, limit: int) -> Page[WebhookEndpoint] | None:
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.deleted_at.is_(None))
    return newest_first(session, stmt, WebhookEndpoint.created_at, WebhookEndpoint.id, WebhookEndpoint.id,
                        after, limit)


def get_event(session: Session, tenant_id: str, event_id: str) -> OutboxEvent | None:
    return session.scalar(select(OutboxEvent).where(OutboxEvent.id == event_id, OutboxEvent.tenant_id == tenant_id))


def list_events(session: Session, tenant_id: str, type_: str | None, after: str | None,
                limit: int) -> Page[OutboxEvent] | None:
    stmt = select(OutboxEvent).where(OutboxEvent.tenant_id == tenant_id)
    if type_:
        stmt = stmt.where(OutboxEvent.type == type_)
    return newest_first(session, stmt, OutboxEvent.seq, OutboxEvent.seq, OutboxEvent.id, after, limit)


def delivery_attempts(session: Session, event_id: str) -> list[DeliveryAttempt]:
    return list(session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.event_id == event_id)
                                .order_by(DeliveryAttempt.id.desc())))


def destinations(session: Session, event_id: str) -> list[tuple[str | None, str, str]]:
    """(endpoint ID, destination, URL) of every destination the event was meant for."""
    rows = session.execute(select(WebhookDelivery.endpoint_id, WebhookDelivery.destination, WebhookDelivery.url)
                           .where(WebhookDelivery.event_id == event_id).distinct()).all()
    return [(r[0], r[1], r[2]) for r in rows]


def purge_events(session: Session, before: datetime) -> int:
    """Delete events made before ``before`` that no delivery still waits on, with their deliveries and attempts."""
    waiting = select(WebhookDelivery.event_id).where(WebhookDelivery.status == "pending")
    result = session.execute(delete(OutboxEvent).where(
        OutboxEvent.created_at < before, OutboxEvent.dispatched_at.is_not(None), OutboxEvent.id.not_in(waiting)))
    return int(getattr(result, "rowcount", 0) or 0)


def open_and_failed_deliveries(session: Session) -> dict[str, int]:
    """Deliveries waiting for an attempt (pending) and given up (failed), by status: the metrics gauge.

    Succeeded ones are the bulk of the table and are not counted; the status index serves the rest.
    """
    rows = session.execute(select(WebhookDelivery.status, func.count())
                           .where(WebhookDelivery.status.in_(("pending", "failed")))
                           .group_by(WebhookDelivery.status)).all()
    return {str(status): int(count) for status, count in rows}


def recent_attempt_outcomes(session: Session, since: datetime, limit: int = 10_000) -> dict[str, int]:
    """Delivery attempts made since ``since``, by outcome (succeeded: a 2xx answer; failed: anything else).

    Only the newest ``limit`` attempts are read, backwards along the primary key, so a scrape costs the same
    however long the table grows; past that many attempts in the window the counts are capped (their ratio
    still holds).
    """
    newest = (select(DeliveryAttempt.status_code, DeliveryAttempt.created_at)
              .order_by(DeliveryAttempt.id.desc()).limit(limit).subquery())
    outcome = case((newest.c.status_code.between(200, 299), "succeeded"), else_="failed")
    rows = session.execute(select(outcome, func.count()).where(newest.c.created_at >= since)
                           .group_by(outcome)).all()
    return {str(name): int(count) for name, count in rows}
