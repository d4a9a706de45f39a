"""Online inference rows: created by the API, claimed and finished by the inference worker, all in bulk.

Each function is one statement on the connection it is given (the worker's `relaxed_engine()`: autocommit,
no wait for the WAL flush; the API's autocommit asyncio engine) and takes many rows at once, so a busy API or
worker pays a round trip per batch of requests, not per request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Session
from sqlalchemy.types import DateTime, String

from db.models import Inference

_INSERT = text(
    "INSERT INTO inferences (id, tenant_id, endpoint, model, status, request, created_at) "
    "SELECT v.id, v.tenant_id, v.endpoint, v.model, 'queued', CAST(v.request AS jsonb), v.created_at "
    "FROM unnest(:ids, :tenant_ids, :endpoints, :models, :requests, :created) "
    "  AS v(id, tenant_id, endpoint, model, request, created_at)"
).bindparams(*(bindparam(name, type_=ARRAY(String)) for name in ("ids", "tenant_ids", "endpoints", "models",
                                                                  "requests")),
             bindparam("created", type_=ARRAY(DateTime(timezone=True))))

# Claims each queued row once (a redelivered message finds it running) and reads its model alongside.
_CLAIM = text(
    "WITH claimed AS ("
    "  UPDATE inferences SET status = 'running' WHERE id = ANY(:ids) AND status = 'queued'"
    "  RETURNING id, endpoint, request, tenant_id, model) "
    "SELECT c.id, c.endpoint, c.request, c.tenant_id, c.model, m.path, m.tenant_id, m.deleted_at IS NOT NULL "
    "FROM claimed c LEFT JOIN models m ON m.id = c.model"
).bindparams(bindparam("ids", type_=ARRAY(String)))

_FINISH = text(
    "UPDATE inferences AS i SET status = v.status, response = CAST(v.response AS jsonb), "
    "  error = CAST(v.error AS jsonb), finished_at = :finished_at "
    "FROM unnest(:ids, :statuses, :responses, :errors) AS v(id, status, response, error) "
    "WHERE i.id = v.id"
).bindparams(*(bindparam(name, type_=ARRAY(String)) for name in ("ids", "statuses", "responses", "errors")))


_ABANDON = text(
    "UPDATE inferences SET status = 'failed', error = :error, finished_at = :now "
    "WHERE status IN ('queued', 'running') AND created_at < :before"
).bindparams(bindparam("error", type_=JSONB))


@dataclass(frozen=True)
class Claim:
    """A request the worker now owns, with what it needs of its model (path None: the model is gone)."""

    id: str
    endpoint: str
    request: dict[str, Any]
    tenant_id: str
    model_id: str
    model_path: str | None
    model_tenant_id: str | None
    model_deleted: bool

    def servable(self) -> bool:
        """The model still exists and is the tenant's own or a base model."""
        return (self.model_path is not None and not self.model_deleted
                and self.model_tenant_id in (None, self.tenant_id))


@dataclass(frozen=True)
class NewRequest:
    """An online request as the API received it, before its row exists."""

    id: str
    tenant_id: str
    endpoint: str
    model: str
    request: dict[str, Any]
    created_at: datetime


def create(conn: Connection, requests: list[NewRequest]) -> None:
    """Insert the requests' rows, queued, as one statement."""
    conn.execute(_INSERT, {"ids": [r.id for r in requests], "tenant_ids": [r.tenant_id for r in requests],
                           "endpoints": [r.endpoint for r in requests], "models": [r.model for r in requests],
                           "requests": [json.dumps(r.request) for r in requests],
                           "created": [r.created_at for r in requests]})


def get(session: Session, tenant_id: str, inference_id: str) -> Inference | None:
    row = session.get(Inference, inference_id, populate_existing=True)
    return row if row is not None and row.tenant_id == tenant_id else None


def claim(conn: Connection, ids: list[str]) -> dict[str, Claim]:
    """Mark the queued rows among `ids` running; the claimed ones by ID (others were taken or are gone)."""
    rows = conn.execute(_CLAIM, {"ids": ids}).all()
    return {row[0]: Claim(*row) for row in rows}


def finish(conn: Connection, outcomes: list[tuple[str, dict[str, Any]]], finished_at: datetime) -> None:
    """Write each (ID, reply) outcome: its status, response and error, as one statement."""
    if not outcomes:
        return
    columns: dict[str, list[str | None]] = {"ids": [], "statuses": [], "responses": [], "errors": []}
    for inference_id, reply in outcomes:
        columns["ids"].append(inference_id)
        columns["statuses"].append(reply["status"])
        columns["responses"].append(None if reply["response"] is None else json.dumps(reply["response"]))
        columns["errors"].append(None if reply["error"] is None else json.dumps(reply["error"]))
    conn.execute(_FINISH, {**columns, "finished_at": finished_at})


def abandon(conn: Connection, before: datetime, now: datetime, error: dict[str, Any]) -> int:
    """Fail the requests created before `before` that are still unanswered; how many there were."""
    return conn.execute(_ABANDON, {"before": before, "now": now, "error": error}).rowcount


def purge_finished(session: Session, before: datetime) -> int:
    """Delete answered requests (their inputs and outputs) finished before ``before``."""
    result = session.execute(delete(Inference).where(Inference.finished_at < before))
    return int(getattr(result, "rowcount", 0) or 0)
