"""Webhook delivery on the ``cpu`` queue: one sender per destination at a time, in event order.

Retries are rows with ``next_attempt_at``; beat sends what is due, so a retry hours away never sits in
the broker, and every attempt survives restarts of every process.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from core.clock import utcnow
from core.settings import get_settings
from db.models import DeliveryAttempt, OutboxEvent, WebhookDelivery, WebhookEndpoint
from db.session import session_factory, transaction
from domain import dispatch, webhooks
from domain.events import emit_event, event_object
from infra import broker
from tasks.app import celery_app

log = logging.getLogger(__name__)
BATCH = 100
EXCERPT_BYTES = 1024


@lru_cache(maxsize=1)
def http_client() -> httpx.Client:
    # Redirects are never followed: a 3xx is a failed attempt, and cannot bounce us to a private address.
    return httpx.Client(timeout=get_settings().webhook_timeout_seconds, follow_redirects=False,
                        limits=httpx.Limits(max_keepalive_connections=50, max_connections=100))


def _lock_key(destination: str) -> int:
    return zlib.crc32(destination.encode()) - 2**31


@celery_app.task(name=webhooks.TASK_FLUSH)
def flush(destination: str) -> int:
    """Send every due delivery of one destination, oldest event first; returns how many were tried.

    One sender per destination (a session-level advisory lock) keeps event order; each batch is read in
    one query and recorded in one transaction, with no transaction open while HTTP requests are in flight.
    """
    key = _lock_key(destination)
    tried = 0
    with session_factory()() as session:
        if not session.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            return 0  # another sender has this destination
        session.commit()  # the lock is session-level: it outlives this and every later commit
        try:
            while batch := _due_batch(session, destination):
                results = _send_batch(batch)
                _record_batch(session, results)
                tried += len(results)
        finally:
            session.rollback()
            session.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            session.commit()
        # A delivery committed while we were letting go found the lock taken: pick it up now.
        if _due_batch(session, destination, limit=1):
            broker.publish(dispatch.StagedTask(webhooks.TASK_FLUSH, (destination,), None, dispatch.QUEUE_CPU))
        session.commit()
    return tried


Due = tuple[WebhookDelivery, OutboxEvent, WebhookEndpoint | None]


def _due_batch(session: Session, destination: str, limit: int = BATCH) -> list[Due]:
    """The next due deliveries with their events and endpoints; those of a dead endpoint are failed."""
    rows = session.execute(
        select(WebhookDelivery, OutboxEvent, WebhookEndpoint)
        .join(OutboxEvent, OutboxEvent.id == WebhookDelivery.event_id)
        .outerjoin(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.destination == destination, WebhookDelivery.status == "pending",
               WebhookDelivery.next_attempt_at <= utcnow())
        .order_by(WebhookDelivery.event_seq, WebhookDelivery.id)
        .limit(limit)
    ).all()
    due: list[Due] = []
    for delivery, event, endpoint in rows:
        if delivery.endpoint_id is not None and (endpoint is None or endpoint.status != "enabled"
                                                 or endpoint.deleted_at is not None):
            delivery.status, delivery.next_attempt_at, delivery.updated_at = "failed", None, utcnow()
            continue
        due.append((delivery, event, endpoint))
    session.commit()
    return due


@dataclass
class Sent:
    delivery: WebhookDelivery
    endpoint: WebhookEndpoint | None
    status_code: int | None
    duration_ms: int
    excerpt: str | None
    error: str | None


def _send_batch(batch: list[Due]) -> list[Sent]:
    results: list[Sent] = []
    secrets_cache: dict[str, list[str]] = {}
    for delivery, event, endpoint in batch:
        if endpoint is not None:
            keys = webhooks.active_secrets(endpoint)
        else:
            if event.tenant_id not in secrets_cache:
                with transaction() as session:
                    secrets_cache[event.tenant_id] = [webhooks.tenant_secret(session, event.tenant_id)]
            keys = secrets_cache[event.tenant_id]
        sent = _attempt(delivery, event, endpoint, keys)
        results.append(sent)
        if sent.status_code == 410:
            break  # the endpoint is gone; the rest of the batch is failed when recorded
    return results


def _attempt(delivery: WebhookDelivery, event: OutboxEvent, endpoint: WebhookEndpoint | None,
             keys: list[str]) -> Sent:
    """One signed POST; never raises for what the receiver or the network does."""
    body = json.dumps(event_object(event), separators=(",", ":")).encode()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "llmos-webhooks/1",
        "webhook-id": event.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": webhooks.signature_header(keys, event.id, timestamp, body),
    }
    started = time.perf_counter()
    status_code: int | None = None
    excerpt: str | None = None
    error: str | None = None
    try:
        response = _post(delivery.url, body, headers)
        status_code = response.status_code
        excerpt = response.content[:EXCERPT_BYTES].decode("utf-8", "replace")
    except webhooks.UnsafeURL as exc:
        error = f"refused: {exc}"
    except httpx.TimeoutException:
        error = f"timed out after {get_settings().webhook_timeout_seconds:.0f}s"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    duration = int((time.perf_counter() - started) * 1000)
    return Sent(delivery, endpoint, status_code, duration, excerpt, error)


def _record_batch(session: Session, results: list[Sent]) -> None:
    """Every attempt of a batch, and what follows from it, in one transaction."""
    now = utcnow()
    schedule = webhooks.retry_schedule()
    for sent in results:
        delivery, endpoint = sent.delivery, sent.endpoint  # still attached: the session never closed
        attempt_no = delivery.attempts + 1
        session.add(DeliveryAttempt(
            delivery_id=delivery.id, event_id=delivery.event_id, endpoint_id=delivery.endpoint_id,
            url=delivery.url, attempt=attempt_no, status_code=sent.status_code, duration_ms=sent.duration_ms,
            response_excerpt=sent.excerpt, error=sent.error, created_at=now,
        ))
        delivery.attempts, delivery.updated_at = attempt_no, now
        if sent.status_code is not None and 200 <= sent.status_code < 300:
            delivery.status, delivery.next_attempt_at = "succeeded", None
            continue
        if sent.status_code == 410:
            delivery.status, delivery.next_attempt_at = "failed", None
            if endpoint is not None:
                _disable(session, endpoint, "the endpoint answered 410 Gone")
        elif attempt_no > len(schedule):
            delivery.status, delivery.next_attempt_at = "failed", None
            if endpoint is not None:
                _disable(session, endpoint, f"delivery failed {attempt_no} times over the whole retry schedule")
        else:
            delivery.next_attempt_at = now + timedelta(seconds=schedule[attempt_no - 1])
    session.commit()


@celery_app.task(name=webhooks.TASK_DISPATCH_DUE)
def dispatch_due() -> int:
    """Beat: hand every destination with due retries to a sender."""
    with transaction() as session:
        destinations = session.scalars(
            select(WebhookDelivery.destination).where(
                WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow()
            ).distinct()
        ).all()
    for destination in destinations:
        broker.publish(dispatch.StagedTask(webhooks.TASK_FLUSH, (destination,), None, dispatch.QUEUE_CPU))
    return len(destinations)


def _post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    """POST to the address we checked, not to whatever the name resolves to a moment later."""
    host, port, addresses = webhooks.resolve_safe(url)
    parts = urlsplit(url)
    address = addresses[0]
    netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    return http_client().post(pinned, content=body, headers={**headers, "host": parts.netloc.rsplit("@", 1)[-1]},
                              extensions={"sni_hostname": host})


def _disable(session: Session, endpoint: WebhookEndpoint, reason: str) -> None:
    if endpoint.status == "disabled":
        return
    endpoint.status, endpoint.updated_at = "disabled", utcnow()
    log.warning("disabled webhook endpoint %s: %s", endpoint.id, reason)
    emit_event(session, endpoint.tenant_id, "webhook_endpoint.disabled",
               {**webhooks.endpoint_object(endpoint), "reason": reason})
