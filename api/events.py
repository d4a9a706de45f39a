"""The tenant's event log (for clients that poll), delivery attempts and redelivery."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from api import objects
from api.boundary import read, transaction
from api.deps import Principal, require
from api.pages import After, Limit
from domain import events

router = APIRouter(prefix="/v1/events", tags=["events"])
scope = require("webhooks")


@router.get("", summary="List the tenant's events, newest first", response_model=objects.ListOf[objects.Event])
async def list_events(type: str | None = Query(None, max_length=64), limit: int = Limit, after: str | None = After,
                      principal: Principal = Depends(scope)) -> dict[str, Any]:
    return await read(events.list_events, tenant_id=principal.tenant_id, type_=type, after=after, limit=limit)


@router.get("/{event_id}", summary="Retrieve an event", response_model=objects.Event)
async def get_event(event_id: str, principal: Principal = Depends(scope)) -> dict[str, Any]:
    return await read(events.get_event, tenant_id=principal.tenant_id, event_id=event_id)


@router.get("/{event_id}/deliveries", summary="Every delivery attempt of an event",
            response_model=objects.ListOf[objects.DeliveryAttempt])
async def list_deliveries(event_id: str, principal: Principal = Depends(scope)) -> dict[str, Any]:
    return await read(events.list_deliveries, tenant_id=principal.tenant_id, event_id=event_id)


@router.post("/{event_id}/redeliver", summary="Send the event again to every destination it was meant for",
             response_model=objects.Redelivered)
async def redeliver(event_id: str, principal: Principal = Depends(scope)) -> dict[str, Any]:
    return await transaction(events.redeliver, tenant_id=principal.tenant_id, event_id=event_id)
