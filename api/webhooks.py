"""Webhook endpoints: create (secret shown once), list, get, update, delete, rotate the secret."""

from __future__ import annotations

from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends
from pydantic import Field, field_validator

from api import objects
from api.boundary import read, transaction
from api.deps import Principal, require
from api.errors import APIError
from api.pages import After, Limit
from domain import webhooks
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


async def check_webhook_url(url: str, param: str = "url") -> None:
    """The address rule, at registration: a 400 naming the field, never a later surprise.

    Resolving the host blocks, so it runs on a worker thread, off the event loop.
    """
    try:
        await anyio.to_thread.run_sync(webhooks.resolve_safe, url)
    except webhooks.UnsafeURL as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_webhook_url") from None


@router.post("", summary="Register a webhook endpoint (its secret is shown only here)",
             response_model=objects.WebhookEndpointWithSecret)
async def create_endpoint(body: CreateEndpoint, principal: Principal = Depends(scope)) -> dict[str, Any]:
    await check_webhook_url(body.url)
    return await transaction(webhooks.create_endpoint, tenant_id=principal.tenant_id, url=body.url,
                             events=body.events, description=body.description)


@router.get("", summary="List webhook endpoints", response_model=objects.ListOf[objects.WebhookEndpoint])
async def list_endpoints(limit: int = Limit, after: str | None = After,
                         principal: Principal = Depends(scope)) -> dict[str, Any]:
    return await read(webhooks.list_endpoints, tenant_id=principal.tenant_id, after=after, limit=limit)


@router.get("/default_secret", summary="The secret that signs deliveries to jobs' own webhook_url",
            response_model=objects.Secret)
async def default_secret(principal: Principal = Depends(scope)) -> dict[str, str]:
    return await transaction(webhooks.default_secret, tenant_id=principal.tenant_id)


@router.get("/{endpoint_id}", summary="Retrieve a webhook endpoint", response_model=objects.WebhookEndpoint)
async def get_endpoint(endpoint_id: str, principal: Principal = Depends(scope)) -> dict[str, Any]:
    return await read(webhooks.get_endpoint, tenant_id=principal.tenant_id, endpoint_id=endpoint_id)


@router.patch("/{endpoint_id}", summary="Update a webhook endpoint", response_model=objects.WebhookEndpoint)
async def update_endpoint(endpoint_id: str, body: UpdateEndpoint,
                          principal: Principal = Depends(scope)) -> dict[str, Any]:
    if body.url is not None:
        await check_webhook_url(body.url)
    return await transaction(webhooks.update_endpoint, tenant_id=principal.tenant_id, endpoint_id=endpoint_id,
                             url=body.url, events=body.events, description=body.description, status=body.status)


@router.delete("/{endpoint_id}", summary="Delete a webhook endpoint", response_model=objects.Deleted)
async def delete_endpoint(endpoint_id: str, principal: Principal = Depends(scope)) -> dict[str, Any]:
    return await transaction(webhooks.delete_endpoint, tenant_id=principal.tenant_id, endpoint_id=endpoint_id)


@router.post("/{endpoint_id}/rotate_secret", summary="Rotate the secret; the old one signs too for 24 h",
             response_model=objects.WebhookEndpointWithSecret)
async def rotate_secret(endpoint_id: str, principal: Principal = Depends(scope)) -> dict[str, Any]:
    return await transaction(webhooks.rotate_secret, tenant_id=principal.tenant_id, endpoint_id=endpoint_id)
