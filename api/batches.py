"""Batches: offline inference over an uploaded file (OpenAI's Batch API): create, list, get, cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from api import objects
from api.boundary import read, transaction
from api.deps import Principal, require
from api.pages import After, Limit
from api.schemas import CreateBatch
from api.webhooks import check_webhook_url
from domain import batches

router = APIRouter(prefix="/v1/batches", tags=["batches"])
batches_scope = require("batches")


@router.post("", summary="Create a batch", response_model=objects.Batch)
async def create_batch(body: CreateBatch, principal: Principal = Depends(batches_scope)) -> dict[str, Any]:
    if body.webhook_url:
        await check_webhook_url(body.webhook_url, "webhook_url")
    return await transaction(batches.create_batch, tenant_id=principal.tenant_id, input_file_id=body.input_file_id,
                             endpoint=body.endpoint, completion_window=body.completion_window,
                             metadata=body.metadata, webhook_url=body.webhook_url)


@router.get("", summary="List batches, newest first", response_model=objects.ListOf[objects.Batch])
async def list_batches(limit: int = Limit, after: str | None = After,
                       principal: Principal = Depends(batches_scope)) -> dict[str, Any]:
    return await read(batches.list_batches, tenant_id=principal.tenant_id, after=after, limit=limit)


@router.get("/{batch_id}", summary="Retrieve a batch", response_model=objects.Batch)
async def get_batch(batch_id: str, principal: Principal = Depends(batches_scope)) -> dict[str, Any]:
    return await read(batches.get_batch, tenant_id=principal.tenant_id, batch_id=batch_id)


@router.post("/{batch_id}/cancel", summary="Cancel a batch; lines already answered are kept",
             response_model=objects.Batch)
async def cancel_batch(batch_id: str, principal: Principal = Depends(batches_scope)) -> dict[str, Any]:
    return await transaction(batches.cancel_batch, tenant_id=principal.tenant_id, batch_id=batch_id)
