"""Online inference rows: created by the API, claimed and finished by the inference worker in bulk.

Each function is one statement on `relaxed_engine()` (autocommit, no wait for the WAL flush), and the
worker's calls take many rows at once, so a busy worker pays a round trip per batch, not per request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.types import String

from db.session import relaxed_engine

_INSERT = text(
    "INSERT INTO inferences (id, tenant_id, endpoint, model, status, request, created_at) "
    "VALUES (:id, :tenant_id, :endpoint, :model, 'queued', :request, :created_at)"
).bindparams(bindparam("request", type_=JSONB))

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


def create(inference_id: str, tenant_id: str, endpoint: str, model: str, request: dict[str, Any],
           created_at: datetime) -> None:
    with relaxed_engine().connect() as conn:
        conn.execute(_INSERT, {"id": inference_id, "tenant_id": tenant_id, "endpoint": endpoint, "model": model,
                               "request": request, "created_at": created_at})


def claim(ids: list[str]) -> dict[str, Claim]:
    """Mark the queued rows among `ids` running; the claimed ones by ID (others were taken or are gone)."""
    with relaxed_engine().connect() as conn:
        rows = conn.execute(_CLAIM, {"ids": ids}).all()
    return {row[0]: Claim(*row) for row in rows}


def finish(outcomes: list[tuple[str, dict[str, Any]]], finished_at: datetime) -> None:
    """Write each (ID, reply) outcome: its status, response and error, as one statement."""
    if not outcomes:
        return
    columns: dict[str, list[str | None]] = {"ids": [], "statuses": [], "responses": [], "errors": []}
    for inference_id, reply in outcomes:
        columns["ids"].append(inference_id)
        columns["statuses"].append(reply["status"])
        columns["responses"].append(None if reply["response"] is None else json.dumps(reply["response"]))
        columns["errors"].append(None if reply["error"] is None else json.dumps(reply["error"]))
    with relaxed_engine().connect() as conn:
        conn.execute(_FINISH, {**columns, "finished_at": finished_at})


def abandon(before: datetime, now: datetime, error: dict[str, Any]) -> int:
    """Fail the requests created before `before` that are still unanswered; how many there were."""
    with relaxed_engine().connect() as conn:
        return conn.execute(_ABANDON, {"before": before, "now": now, "error": error}).rowcount
