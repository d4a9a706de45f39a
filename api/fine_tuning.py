"""Fine-tuning jobs: create, list, get, cancel, pause, resume, events, checkpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from api import objects
from api.boundary import read, read_rows, transaction
from api.deps import Principal, require
from api.pages import After, Limit
from api.schemas import CreateJob
from api.webhooks import check_webhook_url
from domain import jobs
from domain.integrations import check_integrations

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
fine_tuning = require("fine_tuning")


async def create(body: CreateJob, principal: Principal) -> dict[str, Any]:
    """`POST /v1/fine_tuning/jobs`, shared with the seed route `/micromodel`."""
    if body.webhook_url:
        await check_webhook_url(body.webhook_url, "webhook_url")
    integrations = [entry.model_dump(exclude_none=True) for entry in body.integrations or []]
    if integrations:
        # Resolves tracking servers' hosts: off the event loop.
        await anyio.to_thread.run_sync(check_integrations, integrations)
    return await transaction(
        jobs.create_job, tenant_id=principal.tenant_id, model=body.model, training_file=body.training_file,
        validation_file=body.validation_file, task=body.task, hyperparameters=body.resolved_hyperparameters(),
        suffix=body.suffix, seed=body.seed, metadata=body.metadata, webhook_url=body.webhook_url,
        priority=body.priority or 0, processes=body.compute.processes if body.compute else 1,
        integrations=integrations,
    )


@router.post("", summary="Create a fine-tuning job", response_model=objects.FineTuningJob)
async def create_job(body: CreateJob, principal: Principal = Depends(fine_tuning)) -> dict[str, Any]:
    return await create(body, principal)


@router.get("", summary="List fine-tuning jobs", response_model=objects.ListOf[objects.FineTuningJob])
async def list_jobs(
    request: Request,
    status: str | None = Query(None, max_length=32),
    limit: int = Limit,
    after: str | None = After,
    principal: Principal = Depends(fine_tuning),
) -> dict[str, Any]:
    metadata = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    return await read(jobs.list_jobs, tenant_id=principal.tenant_id, status=status, metadata=metadata,
                      after=after, limit=limit)


@router.get("/{job_id}", summary="Retrieve a fine-tuning job", response_model=objects.FineTuningJob)
async def get_job(job_id: str, principal: Principal = Depends(fine_tuning)) -> dict[str, Any]:
    return await read_rows(jobs.get_job, tenant_id=principal.tenant_id, job_id=job_id)


@router.post("/{job_id}/cancel", summary="Cancel a fine-tuning job", response_model=objects.FineTuningJob)
async def cancel_job(job_id: str, principal: Principal = Depends(fine_tuning)) -> dict[str, Any]:
    return await transaction(jobs.cancel_job, tenant_id=principal.tenant_id, job_id=job_id)


@router.post("/{job_id}/pause", summary="Pause a fine-tuning job (extension)", response_model=objects.FineTuningJob)
async def pause_job(job_id: str, principal: Principal = Depends(fine_tuning)) -> dict[str, Any]:
    return await transaction(jobs.pause_job, tenant_id=principal.tenant_id, job_id=job_id)


@router.post("/{job_id}/resume", summary="Resume a paused fine-tuning job (extension)",
             response_model=objects.FineTuningJob)
async def resume_job(job_id: str, principal: Principal = Depends(fine_tuning)) -> dict[str, Any]:
    return await transaction(jobs.resume_job, tenant_id=principal.tenant_id, job_id=job_id)


@router.get(
    "/{job_id}/events",
    summary="List a job's events, newest first; ?stream=true for live SSE",
    response_model=objects.ListOf[objects.JobEvent],
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "The list; with `stream=true`, Server-Sent Events until the job ends."}},
)
async def list_events(
    job_id: str,
    limit: int = Limit,
    after: str | None = After,
    stream: bool = Query(False, description="Serve the events live as Server-Sent Events until the job ends."),
    principal: Principal = Depends(fine_tuning),
) -> Any:
    listed = await read(jobs.list_events, tenant_id=principal.tenant_id, job_id=job_id, after=after, limit=limit)
    if stream:
        return StreamingResponse(_event_stream(job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return listed


STREAM_POLL_SECONDS = 0.5


async def _event_stream(job_id: str) -> AsyncIterator[bytes]:
    """Every event oldest first, then new ones as they are written, until the job is terminal.

    Between polls the stream holds neither a thread nor a database connection, only its coroutine.
    """
    last_seq = 0
    while True:
        rows, status = await read(jobs.events_since, job_id=job_id, after_seq=last_seq)
        for seq, event in rows:
            last_seq = seq
            yield b"id: %s\nevent: %s\ndata: %s\n\n" % (event["id"].encode(), event["type"].encode(),
                                                      orjson.dumps(event))
        if len(rows) >= jobs.STREAM_PAGE:
            continue  # more are waiting: read them before judging the status
        if status is None or status in jobs.TERMINAL:
            yield b"event: done\ndata: %s\n\n" % orjson.dumps({"status": status})
            return
        if not rows:
            yield b": keep-alive\n\n"
            await asyncio.sleep(STREAM_POLL_SECONDS)


@router.get("/{job_id}/checkpoints", summary="List a job's checkpoints, newest first",
            response_model=objects.ListOf[objects.Checkpoint])
async def list_checkpoints(
    job_id: str,
    limit: int = Limit,
    after: str | None = After,
    principal: Principal = Depends(fine_tuning),
) -> dict[str, Any]:
    return await read(jobs.list_checkpoints, tenant_id=principal.tenant_id, job_id=job_id, after=after,
                      limit=limit)
