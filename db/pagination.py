"""Cursor pagination, newest first: ``after`` names the last item the client has seen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    items: list[T]
    has_more: bool


def newest_first(
    session: Session,
    stmt: Select[Any],
    order: InstrumentedAttribute[Any],
    tiebreak: InstrumentedAttribute[Any],
    id_column: InstrumentedAttribute[Any],
    after: str | None,
    limit: int,
) -> Page[Any] | None:
    """Apply keyset pagination on (order, tiebreak) descending; None when ``after`` is not in the set."""
    if after is not None:
        cursor = session.execute(
            stmt.with_only_columns(order, tiebreak).where(id_column == after)
        ).first()
        if cursor is None:
            return None
        stmt = stmt.where(or_(order < cursor[0], and_(order == cursor[0], tiebreak < cursor[1])))
    rows = list(session.scalars(stmt.order_by(order.desc(), tiebreak.desc()).limit(limit + 1)))
    return Page(items=rows[:limit], has_more=len(rows) > limit)


def select_for(model: type[T]) -> Select[tuple[T]]:
    return select(model)
