"""Webhooks by the Standard Webhooks spec: secrets, signatures, the address rule and fan-out."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import ids
from core.clock import unix, utcnow
from core.errors import not_found
from core.sealing import reseal, seal, unseal
from core.settings import get_settings
from db import tenants as tenants_repo
from db import webhooks as webhooks_repo
from db.models import OutboxEvent, TenantWebhookSecret, WebhookDelivery, WebhookEndpoint
from domain import dispatch, quotas
from domain.listing import page

TASK_FLUSH = "llmos.webhooks.flush"
TASK_DISPATCH_DUE = "llmos.webhooks.dispatch_due"
SECRET_PREFIX = "whsec_"
ROTATION_OVERLAP = timedelta(hours=24)

EVENT_TYPES = (
    "fine_tuning.job.validating_files", "fine_tuning.job.queued", "fine_tuning.job.running",
    "fine_tuning.job.progress", "fine_tuning.job.paused", "fine_tuning.job.succeeded",
    "fine_tuning.job.failed", "fine_tuning.job.cancelled",
    "batch.in_progress", "batch.completed", "batch.failed", "batch.expired", "batch.cancelled",
    "model.created", "webhook_endpoint.disabled",
)


class UnsafeURL(ValueError):
    """A webhook URL that must not be called: bad scheme, unresolvable, or a private address."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{ts}.{body}">`` keyed by the decoded secret."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signature_header(active_secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """Space-separated signatures, one per active secret (two while a rotation overlaps)."""
    return " ".join(sign(s, msg_id, timestamp, body) for s in active_secrets)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _forbidden(address: str) -> bool:
    """Anything but a globally routable unicast address: private, loopback, link-local, shared (100.64.0.0/10,
    where cloud metadata services live), reserved, multicast; and IPv6 forms that tunnel to an IPv4 address
    (6to4, Teredo, NAT64) or are site-local, which Python's `is_global` lets through on some versions."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None or ip.teredo is not None or ip.is_site_local:
            return True
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return not ip.is_global or ip.is_multicast


def resolve_safe(url: str, allow_private: bool | None = None) -> tuple[str, int, list[str]]:
    """Check the URL and resolve its host; returns (host, port, addresses) or raises UnsafeURL."""
    allow = get_settings().webhook_allow_private if allow_private is None else allow_private
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeURL("webhook URLs must be absolute http(s) URLs")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeURL("the URL's port is not a number") from None
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UnsafeURL(f"cannot resolve host '{parts.hostname}'") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow:
        bad = [a for a in addresses if _forbidden(a)]
        if bad:
            raise UnsafeURL(f"'{parts.hostname}' resolves to a private, loopback or link-local address "
                            f"({bad[0]}); set LLMOS_WEBHOOK_ALLOW_PRIVATE=1 to allow it")
    return parts.hostname, port, addresses


def tenant_secret(session: Session, tenant_id: str) -> str:
    """The tenant's default signing secret, created on first use."""
    row = session.get(TenantWebhookSecret, tenant_id)
    if row is None:
        row = TenantWebhookSecret(tenant_id=tenant_id, secret=seal(new_secret()))
        session.add(row)
        session.flush()
    return unseal(row.secret)


def active_secrets(endpoint: WebhookEndpoint) -> list[str]:
    keys = [unseal(endpoint.secret)]
    if endpoint.previous_secret and endpoint.previous_secret_expires_at and \
            endpoint.previous_secret_expires_at > utcnow():
        keys.append(unseal(endpoint.previous_secret))
    return keys


def reseal_secrets(session: Session) -> int:
    """Seal every stored signing secret with the first key of `LLMOS_SECRET_KEY` (rotation; plain ones too)."""
    count = 0
    for endpoint in session.scalars(select(WebhookEndpoint)):
        endpoint.secret = reseal(endpoint.secret)
        if endpoint.previous_secret:
            endpoint.previous_secret = reseal(endpoint.previous_secret)
        count += 1
    for row in session.scalars(select(TenantWebhookSecret)):
        row.secret = reseal(row.secret)
        count += 1
    return count


def url_destination(url: str) -> str:
    return "url:" + hashlib.sha256(url.encode()).hexdigest()[:64]


def matches(endpoint: WebhookEndpoint, event_type: str) -> bool:
    return "*" in endpoint.events or event_type in endpoint.events


def fan_out(session: Session, event: OutboxEvent) -> int:
    """Create one delivery per destination the event is meant for, in the event's transaction."""
    endpoints = session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id == event.tenant_id, WebhookEndpoint.status == "enabled",
            WebhookEndpoint.deleted_at.is_(None),
        )
    ).all()
    targets: list[tuple[str | None, str, str]] = [
        (e.id, e.id, e.url) for e in endpoints if matches(e, event.type)
    ]
    own_url = event.data.get("webhook_url") if isinstance(event.data, dict) else None
    if own_url:
        targets.append((None, url_destination(own_url), own_url))
    now = utcnow()
    for endpoint_id, destination, url in targets:
        session.add(WebhookDelivery(
            event_id=event.id, event_seq=event.seq, tenant_id=event.tenant_id, endpoint_id=endpoint_id,
            destination=destination, url=url, status="pending", attempts=0, next_attempt_at=now,
            created_at=now, updated_at=now,
        ))
        dispatch.enqueue_after_commit(session, TASK_FLUSH, destination, queue=dispatch.QUEUE_WEBHOOKS, once=True)
    return len(targets)


def retry_schedule() -> list[float]:
    return [float(s) for s in get_settings().webhook_retry_schedule.split(",") if s.strip()]


def endpoint_object(endpoint: WebhookEndpoint, *, with_secret: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": endpoint.id, "object": "webhook_endpoint", "url": endpoint.url, "events": endpoint.events,
        "description": endpoint.description, "status": endpoint.status, "created_at": unix(endpoint.created_at),
        "updated_at": unix(endpoint.updated_at),
    }
    if with_secret:
        body["secret"] = unseal(endpoint.secret)
    return body


# --------------------------------------------------------------------------------------------------------
# The endpoints service. URLs passed in must already have passed `resolve_safe` (it blocks on DNS).
# --------------------------------------------------------------------------------------------------------


def _endpoint(session: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    row = webhooks_repo.get_endpoint(session, tenant_id, endpoint_id)
    if row is None:
        raise not_found("webhook_endpoint", endpoint_id)
    return row


def create_endpoint(session: Session, *, tenant_id: str, url: str, events: list[str],
                    description: str | None) -> dict[str, Any]:
    row = WebhookEndpoint(id=ids.new_id(ids.WEBHOOK_ENDPOINT), tenant_id=tenant_id, url=url, events=events,
                          description=description, status="enabled", secret=seal(new_secret()))
    session.add(row)
    session.flush()
    quotas.take(session, tenant_id, "max_webhook_endpoints",
                lambda _cap: tenants_repo.count_webhook_endpoints(session, tenant_id))
    return endpoint_object(row, with_secret=True)


def list_endpoints(session: Session, *, tenant_id: str, after: str | None, limit: int) -> dict[str, Any]:
    return page(webhooks_repo.list_endpoints(session, tenant_id, after, limit), endpoint_object, after)


def default_secret(session: Session, *, tenant_id: str) -> dict[str, str]:
    return {"secret": tenant_secret(session, tenant_id)}


def get_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> dict[str, Any]:
    return endpoint_object(_endpoint(session, tenant_id, endpoint_id))


def update_endpoint(session: Session, *, tenant_id: str, endpoint_id: str, url: str | None = None,
                    events: list[str] | None = None, description: str | None = None,
                    status: str | None = None) -> dict[str, Any]:
    row = _endpoint(session, tenant_id, endpoint_id)
    if url is not None:
        row.url = url
    if events is not None:
        row.events = events
    if description is not None:
        row.description = description
    if status is not None:
        row.status = status
    row.updated_at = utcnow()
    session.flush()
    return endpoint_object(row)


def delete_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> dict[str, Any]:
    row = _endpoint(session, tenant_id, endpoint_id)
    row.deleted_at = row.updated_at = utcnow()
    return {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}


def rotate_secret(session: Session, *, tenant_id: str, endpoint_id: str) -> dict[str, Any]:
    row = _endpoint(session, tenant_id, endpoint_id)
    row.previous_secret = row.secret
    row.previous_secret_expires_at = utcnow() + ROTATION_OVERLAP
    row.secret = seal(new_secret())
    row.updated_at = utcnow()
    session.flush()
    return endpoint_object(row, with_secret=True)
