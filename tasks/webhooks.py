"""Webhook delivery on the ``webhooks`` queue: one sender per destination at a time, in event order.

The queue has workers of its own (a threads pool of `webhook_concurrency`), so receivers, however slow,
delay neither file validation, batches nor the reconciler on the ``cpu`` queue, and up to that many
destinations are served at once.

Retries are rows with ``next_attempt_at``; beat sends what is due, so a retry hours away never sits in
the broker, and every attempt survives restarts of every process.

A receiver cannot hold a worker: an attempt has one deadline (`webhook_timeout_seconds`) from connecting to
the last byte read, whatever pace the receiver answers at, and reads at most 64 KiB of the answer (raw
bytes, never decompressed). The first failed attempt of a batch ends the destination's turn: its other due
deliveries wait for that one's retry, in order, so a slow or dead endpoint costs one deadline per retry,
not one per pending event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import zlib
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from core.clock import utcnow
from core.settings import get_settings
from db.models import DeliveryAttempt, OutboxEvent, WebhookDelivery, WebhookEndpoint
from db.session import get_engine, session_factory, transaction
from domain import dispatch, webhooks
from domain.events import emit_event, event_object
from infra import broker
from tasks.app import celery_app

log = logging.getLogger(__name__)
BATCH = 100
EXCERPT_BYTES = 1024
# Of an answer, at most this much is read; the rest is never received.
MAX_READ_BYTES = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def excerpt_of(raw: bytes) -> str:
    """What the delivery log keeps of an answer: its first KiB as text, control characters removed."""
    return _CONTROL.sub("", raw[:EXCERPT_BYTES].decode("utf-8", "replace"))


def http_client() -> httpx.AsyncClient:
    # Redirects are never followed: a 3xx is a failed attempt, and cannot bounce us to a private address.
    return httpx.AsyncClient(timeout=get_settings().webhook_timeout_seconds, follow_redirects=False,
                             limits=httpx.Limits(max_keepalive_connections=50, max_connections=100))


def _lock_key(destination: str) -> int:
    return zlib.crc32(destination.encode()) - 2**31


@celery_app.task(name=webhooks.TASK_FLUSH)
def flush(destination: str) -> int:
    """Send every due delivery of one destination, oldest event first; returns how many were tried.

    One sender per destination (a session-level advisory lock) keeps event order; each batch is read in
    one query and recorded in one transaction, with no transaction open while HTTP requests are in flight.
    The lock lives on a connection held for the whole flush, apart from the session's: a session hands its
    connection back to the pool at each commit, and with senders as threads of one process another
    thread's session could pick it up, and with it the lock (Postgres' advisory locks are re-entrant).
    """
    key = _lock_key(destination)
    tried = 0
    with get_engine().connect() as lock:
        if not lock.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            return 0  # another sender has this destination
        lock.commit()  # ends the transaction; the connection, and the lock on it, stay ours until released
        try:
            with session_factory()() as session:
                while batch := _due_batch(session, destination):
                    results = _send_batch(batch)
                    _record_batch(session, results)
                    tried += len(results)
        finally:
            lock.rollback()
            lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            lock.commit()
    # A delivery committed while we were letting go found the lock taken: pick it up now.
    with session_factory()() as session:
        if _due_batch(session, destination, limit=1):
            broker.publish(dispatch.StagedTask(webhooks.TASK_FLUSH, (destination,), None, dispatch.QUEUE_WEBHOOKS))
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

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _send_batch(batch: list[Due]) -> list[Sent]:
    """Attempt the batch in order, until the first attempt that fails (the rest wait for its retry)."""
    secrets_cache: dict[str, list[str]] = {}
    signed: list[tuple[WebhookDelivery, OutboxEvent, WebhookEndpoint | None, list[str]]] = []
    for delivery, event, endpoint in batch:
        if endpoint is not None:
            keys = webhooks.active_secrets(endpoint)
        else:
            if event.tenant_id not in secrets_cache:
                with transaction() as session:
                    secrets_cache[event.tenant_id] = [webhooks.tenant_secret(session, event.tenant_id)]
            keys = secrets_cache[event.tenant_id]
        signed.append((delivery, event, endpoint, keys))

    async def send_all() -> list[Sent]:
        results: list[Sent] = []
        async with http_client() as client:
            for delivery, event, endpoint, keys in signed:
                sent = await _attempt(client, delivery, event, endpoint, keys)
                results.append(sent)
                if not sent.ok:
                    break
        return results

    return asyncio.run(send_all())


async def _attempt(client: httpx.AsyncClient, delivery: WebhookDelivery, event: OutboxEvent,
                   endpoint: WebhookEndpoint | None, keys: list[str]) -> Sent:
    """One signed POST within one deadline; never raises for what the receiver or the network does."""
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
    deadline = get_settings().webhook_timeout_seconds
    try:
        async with asyncio.timeout(deadline):
            status_code, answer = await _post(client, delivery.url, body, headers)
        excerpt = excerpt_of(answer)
    except webhooks.UnsafeURL as exc:
        error = f"refused: {exc}"
    except (TimeoutError, httpx.TimeoutException):
        # What arrived before the deadline does not count: a 2xx must come with its whole (capped) answer.
        status_code = None
        error = f"no complete answer within {deadline:g}s"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:EXCERPT_BYTES]
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
    last = results[-1].delivery if results else None
    if last is not None and last.status == "pending" and last.next_attempt_at is not None:
        # The destination failed: what else is due for it waits for this retry, in event order.
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.destination == last.destination, WebhookDelivery.status == "pending",
                   WebhookDelivery.id != last.id, WebhookDelivery.next_attempt_at < last.next_attempt_at)
            .values(next_attempt_at=last.next_attempt_at)
            .execution_options(synchronize_session=False))
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
        broker.publish(dispatch.StagedTask(webhooks.TASK_FLUSH, (destination,), None, dispatch.QUEUE_WEBHOOKS))
    return len(destinations)


async def _post(client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST to the address we checked, not to whatever the name resolves to a moment later; the status and
    at most `MAX_READ_BYTES` of the answer, as sent (a compressed answer is not expanded)."""
    host, port, addresses = await asyncio.to_thread(webhooks.resolve_safe, url)
    parts = urlsplit(url)
    address = addresses[0]
    netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    request = client.build_request("POST", pinned, content=body,
                                   headers={**headers, "host": parts.netloc.rsplit("@", 1)[-1]},
                                   extensions={"sni_hostname": host})
    response = await client.send(request, stream=True)
    try:
        answer = bytearray()
        async for chunk in response.aiter_raw():
            answer += chunk
            if len(answer) >= MAX_READ_BYTES:
                break
        return response.status_code, bytes(answer[:MAX_READ_BYTES])
    finally:
        await response.aclose()


def _disable(session: Session, endpoint: WebhookEndpoint, reason: str) -> None:
    if endpoint.status == "disabled":
        return
    endpoint.status, endpoint.updated_at = "disabled", utcnow()
    log.warning("disabled webhook endpoint %s: %s", endpoint.id, reason)
    emit_event(session, endpoint.tenant_id, "webhook_endpoint.disabled",
               {**webhooks.endpoint_object(endpoint), "reason": reason})
