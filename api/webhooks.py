"""Webhook endpoints: create (secret shown once), list, get, update, delete, rotate the secret."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import Principal, get_session, require
from api.errors import APIError, not_found
from api.pages import After, Limit, page_body
from db.models import WebhookEndpoint
from db.pagination import newest_first
from domain import ids, webhooks
from domain.clock import utcnow
from domain.requests import Strict

router = APIRouter(prefix="/v1/webhook_endpoints", tags=["webhooks"])
scope = require("webhooks")


def _event_filter(values: list[str]) -> list[str]:
    if not values:
        raise ValueError("must name at least one event type, or '*'")
    unknown = [v for v in values if v != "*" and v not in webhooks.EVENT_TYPES]
    if unknown:
        raise ValueError(f"unknown event type '{unknown[0]}'")
    return sorted(set(values))


class CreateEndpoint(Strict):
    url: str = Field(..., max_length=2048)
    events: list[str] = Field(default_factory=lambda: ["*"], max_length=64)
    description: str | None = Field(None, max_length=512)

    @field_validator("events")
    @classmethod
    def _events(cls, v: list[str]) -> list[str]:
        return _event_filter(v)


class UpdateEndpoint(Strict):
    url: str | None = Field(None, max_length=2048)
    events: list[str] | None = Field(None, max_length=64)
    description: str | None = Field(None, max_length=512)
    status: Literal["enabled", "disabled"] | None = None

    @field_validator("events")
    @classmethod
    def _events(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _event_filter(v)


def check_webhook_url(url: str, param: str = "url") -> None:
    """The address rule, at registration: a 400 naming the field, never a later surprise."""
    try:
        webhooks.resolve_safe(url)
    except webhooks.UnsafeURL as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_webhook_url") from None


def _get(session: Session, principal: Principal, endpoint_id: str) -> WebhookEndpoint:
    row = session.scalar(select(WebhookEndpoint).where(
        WebhookEndpoint.id == endpoint_id, WebhookEndpoint.tenant_id == principal.tenant_id,
        WebhookEndpoint.deleted_at.is_(None)))
    if row is None:
        raise not_found("webhook_endpoint", endpoint_id)
    return row


@router.post("", summary="Register a webhook endpoint (its secret is shown only here)")
def create_endpoint(body: CreateEndpoint, principal: Principal = Depends(scope),
                    session: Session = Depends(get_session)) -> dict[str, Any]:
    check_webhook_url(body.url)
    row = WebhookEndpoint(id=ids.new_id(ids.WEBHOOK_ENDPOINT), tenant_id=principal.tenant_id, url=body.url,
                          events=body.events, description=body.description, status="enabled",
                          secret=webhooks.new_secret())
    session.add(row)
    session.commit()
    return webhooks.endpoint_object(row, with_secret=True)


@router.get("", summary="List webhook endpoints")
def list_endpoints(limit: int = Limit, after: str | None = After, principal: Principal = Depends(scope),
                   session: Session = Depends(get_session)) -> dict[str, Any]:
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == principal.tenant_id,
                                         WebhookEndpoint.deleted_at.is_(None))
    page = newest_first(session, stmt, WebhookEndpoint.created_at, WebhookEndpoint.id, WebhookEndpoint.id,
                        after, limit)
    return page_body(page, webhooks.endpoint_object, after)


@router.get("/default_secret", summary="The secret that signs deliveries to jobs' own webhook_url")
def default_secret(principal: Principal = Depends(scope), session: Session = Depends(get_session)) -> dict[str, str]:
    secret = webhooks.tenant_secret(session, principal.tenant_id)
    session.commit()
    return {"secret": secret}


@router.get("/{endpoint_id}", summary="Retrieve a webhook endpoint")
def get_endpoint(endpoint_id: str, principal: Principal = Depends(scope),
                 session: Session = Depends(get_session)) -> dict[str, Any]:
    return webhooks.endpoint_object(_get(session, principal, endpoint_id))


@router.patch("/{endpoint_id}", summary="Update a webhook endpoint")
def update_endpoint(endpoint_id: str, body: UpdateEndpoint, principal: Principal = Depends(scope),
                    session: Session = Depends(get_session)) -> dict[str, Any]:
    row = _get(session, principal, endpoint_id)
    if body.url is not None:
        check_webhook_url(body.url)
        row.url = body.url
    if body.events is not None:
        row.events = body.events
    if body.description is not None:
        row.description = body.description
    if body.status is not None:
        row.status = body.status
    row.updated_at = utcnow()
    session.commit()
    return webhooks.endpoint_object(row)


@router.delete("/{endpoint_id}", summary="Delete a webhook endpoint")
def delete_endpoint(endpoint_id: str, principal: Principal = Depends(scope),
                    session: Session = Depends(get_session)) -> dict[str, Any]:
    row = _get(session, principal, endpoint_id)
    row.deleted_at = row.updated_at = utcnow()
    session.commit()
    return {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}


@router.post("/{endpoint_id}/rotate_secret", summary="Rotate the secret; the old one signs too for 24 h")
def rotate_secret(endpoint_id: str, principal: Principal = Depends(scope),
                  session: Session = Depends(get_session)) -> dict[str, Any]:
    row = _get(session, principal, endpoint_id)
    row.previous_secret = row.secret
    row.previous_secret_expires_at = utcnow() + webhooks.ROTATION_OVERLAP
    row.secret = webhooks.new_secret()
    row.updated_at = utcnow()
    session.commit()
    return webhooks.endpoint_object(row, with_secret=True)
