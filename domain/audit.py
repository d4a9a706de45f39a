"""The audit log: administrative actions (keys created and revoked, tenant limits, models imported), who did
them and when. Services record their own actions in the transaction that makes them, so an entry exists
exactly when the change does; `llmos audit` reads it."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core.clock import unix
from db import tenants as tenants_repo


def record(session: Session, *, actor: str, action: str, target: str | None,
           details: dict[str, Any] | None = None) -> None:
    tenants_repo.record_audit(session, actor, action, target, details)


def entries(session: Session, *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest entries first."""
    return [{"id": row.id, "created_at": unix(row.created_at), "actor": row.actor, "action": row.action,
             "target": row.target, "details": row.details} for row in tenants_repo.audit_entries(session, limit)]
