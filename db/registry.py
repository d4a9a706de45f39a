"""Base and fine-tuned models."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, or_, select
from sqlalchemy.orm import Session

from db.models import Model


def all_models(session: Session) -> list[Model]:
    """Every live model, base and fine-tuned, by ID."""
    return list(session.scalars(select(Model).where(Model.deleted_at.is_(None)).order_by(Model.id)))


def visible_models(session: Session, tenant_id: str) -> list[Model]:
    """Base models and the tenant's own fine-tuned ones, newest first."""
    return list(
        session.scalars(
            select(Model)
            .where(or_(Model.tenant_id.is_(None), Model.tenant_id == tenant_id), Model.deleted_at.is_(None))
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
