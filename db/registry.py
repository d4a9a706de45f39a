"""Base and fine-tuned models."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, or_, select
from sqlalchemy.orm import Session

from core.clock import utcnow
from db.models import FineTuningJob, Model


def all_models(session: Session) -> list[Model]:
    """Every live model, base and fine-tuned, by ID."""
    return list(session.scalars(select(Model).where(Model.deleted_at.is_(None)).order_by(Model.id)))


def visible_models(session: Session, tenant_id: str) -> list[Model]:
    """Base models and the tenant's own fine-tuned ones, newest first. Checkpoints are models too, but are
    listed with their job (`GET /v1/fine_tuning/jobs/{id}/checkpoints`), not here."""
    return list(
        session.scalars(
            select(Model)
            .where(or_(Model.tenant_id.is_(None), Model.tenant_id == tenant_id), Model.deleted_at.is_(None),
                   Model.kind != "checkpoint")
            .order_by(Model.created_at.desc(), Model.id)
        )
    )


def get_visible_model(session: Session, tenant_id: str, model_id: str) -> Model | None:
    return session.scalar(
        select(Model).where(
            Model.id == model_id,
            or_(Model.tenant_id.is_(None), Model.tenant_id == tenant_id),
            Model.deleted_at.is_(None),
        )
    )


@dataclass(frozen=True)
class ServingFacts:
    """What the serving rule reads of a model."""

    kind: str
    tasks: list[str]


_SERVING_FACTS = select(Model.kind, Model.tasks).where(
    Model.id == bindparam("model_id"),
    or_(Model.tenant_id.is_(None), Model.tenant_id == bindparam("tenant_id")),
    Model.deleted_at.is_(None),
)


def visible_serving_facts(conn: Connection, tenant_id: str, model_id: str) -> ServingFacts | None:
    """`get_visible_model`'s model, only the columns serving needs: one statement, no ORM.

    Every online request asks it before it is queued, on an autocommit connection of its own.
    """
    row = conn.execute(_SERVING_FACTS, {"model_id": model_id, "tenant_id": tenant_id}).first()
    return None if row is None else ServingFacts(row[0], list(row[1]))


def upsert_base_model(
    session: Session, name: str, path: str, tasks: list[str], architecture: str, description: str
) -> Model:
    row = session.get(Model, name)
    if row is None:
        row = Model(id=name, tenant_id=None, owned_by="llmos", kind="base", tasks=tasks,
                    architecture=architecture, path=path, description=description)
        session.add(row)
    else:
        row.path, row.tasks, row.architecture, row.description = path, tasks, architecture, description
        row.deleted_at = None
    return row


def retire_checkpoints(session: Session, job_id: str, *, keep: set[str] | None = None) -> list[Model]:
    """Mark the job's checkpoint models deleted, but those named in ``keep``; returns them."""
    rows = session.scalars(select(Model).where(Model.job_id == job_id, Model.kind == "checkpoint",
                                               Model.deleted_at.is_(None))).all()
    return retire_checkpoints_of([row for row in rows if row.id not in (keep or set())])


def retire_checkpoints_of(rows: list[Model]) -> list[Model]:
    now = utcnow()
    for row in rows:
        row.deleted_at = now
    return rows


def aged_checkpoints(session: Session, finished_before: datetime, limit: int = 500) -> list[Model]:
    """Live checkpoint models of jobs that finished before ``finished_before`` (for retention)."""
    return list(session.scalars(
        select(Model).join(FineTuningJob, FineTuningJob.id == Model.job_id)
        .where(Model.kind == "checkpoint", Model.deleted_at.is_(None), FineTuningJob.finished_at < finished_before)
        .limit(limit).with_for_update(of=Model, skip_locked=True)))
