"""Webhook delivery on the ``cpu`` queue: one sender per destination at a time, in event order.

Retries are rows with ``next_attempt_at``; beat sends what is due, so a retry hours away never sits in
the broker, and every attempt survives restarts of every process.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from datetime import timedelta
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from db.models import DeliveryAttempt, OutboxEvent, WebhookDelivery, WebhookEndpoint
from db.session import session_factory, transaction
from domain import dispatch, webhooks
from domain.clock import utcnow
from domain.events import emit_event, event_object
from domain.settings import get_settings
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
    """Send every due delivery of one destination, oldest event first; returns how many were tried."""
    with session_factory()() as lock_session:
        # A session-level advisory lock: a second sender for the same destination backs off.
        got = lock_session.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _lock_key(destination)}).scalar()
        if not got:
            return 0
        try:
            tried = 0
            while True:
                with transaction() as session:
                    due = session.scalars(
                        select(WebhookDelivery.id).where(
                            WebhookDelivery.destination == destination, WebhookDelivery.status == "pending",
                            WebhookDelivery.next_attempt_at <= utcnow(),
                        ).order_by(WebhookDelivery.event_seq).limit(BATCH)
                    ).all()
                if not due:
                    return tried
                for delivery_id in due:
                    attempt_delivery(delivery_id)
                    tried += 1
        finally:
            lock_session.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(destination)})
            lock_session.commit()


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
        dispatch.publish(dispatch.StagedTask(webhooks.TASK_FLUSH, (destination,), None, dispatch.QUEUE_CPU))
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


def attempt_delivery(delivery_id: int) -> None:
    """One attempt: sign, send, record the attempt, and decide success, retry or giving up."""
    with transaction() as session:
        delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
        if delivery is None or delivery.status != "pending":
            return
        event = session.scalar(select(OutboxEvent).where(OutboxEvent.id == delivery.event_id))
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id) if delivery.endpoint_id else None
        if event is None or (endpoint is not None and (endpoint.status != "enabled" or endpoint.deleted_at)):
            delivery.status, delivery.updated_at = "failed", utcnow()
            return
        keys = webhooks.active_secrets(endpoint) if endpoint else [webhooks.tenant_secret(session, event.tenant_id)]
        body = json.dumps(event_object(event), separators=(",", ":")).encode()
        url, attempt_no = delivery.url, delivery.attempts + 1
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
        response = _post(url, body, headers)
        status_code = response.status_code
        excerpt = response.content[:EXCERPT_BYTES].decode("utf-8", "replace")
    except webhooks.UnsafeURL as exc:
        error = f"refused: {exc}"
    except httpx.TimeoutException:
        error = f"timed out after {get_settings().webhook_timeout_seconds:.0f}s"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    duration_ms = int((time.perf_counter() - started) * 1000)
    _record(delivery_id, attempt_no, status_code, duration_ms, excerpt, error)


def _record(delivery_id: int, attempt_no: int, status_code: int | None, duration_ms: int, excerpt: str | None,
            error: str | None) -> None:
    now = utcnow()
    with transaction() as session:
        delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
        if delivery is None:
            return
        session.add(DeliveryAttempt(
            delivery_id=delivery.id, event_id=delivery.event_id, endpoint_id=delivery.endpoint_id,
            url=delivery.url, attempt=attempt_no, status_code=status_code, duration_ms=duration_ms,
            response_excerpt=excerpt, error=error, created_at=now,
        ))
        delivery.attempts, delivery.updated_at = attempt_no, now
        if status_code is not None and 200 <= status_code < 300:
            delivery.status, delivery.next_attempt_at = "succeeded", None
            return
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id) if delivery.endpoint_id else None
        schedule = webhooks.retry_schedule()
        if status_code == 410:
            delivery.status, delivery.next_attempt_at = "failed", None
            if endpoint is not None:
                _disable(session, endpoint, "the endpoint answered 410 Gone")
        elif attempt_no > len(schedule):
            delivery.status, delivery.next_attempt_at = "failed", None
            if endpoint is not None:
                _disable(session, endpoint, f"delivery failed {attempt_no} times over the whole retry schedule")
        else:
            delivery.next_attempt_at = now + timedelta(seconds=schedule[attempt_no - 1])


def _disable(session: Session, endpoint: WebhookEndpoint, reason: str) -> None:
    if endpoint.status == "disabled":
        return
    endpoint.status, endpoint.updated_at = "disabled", utcnow()
    log.warning("disabled webhook endpoint %s: %s", endpoint.id, reason)
    emit_event(session, endpoint.tenant_id, "webhook_endpoint.disabled",
               {**webhooks.endpoint_object(endpoint), "reason": reason})
