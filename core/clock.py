"""Time in one place: UTC datetimes in the database, integer Unix seconds on the wire."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def unix(ts: datetime | None) -> int | None:
    return None if ts is None else int(ts.timestamp())
