"""Engine and sessions. Transactions are committed at the boundary (request or task), never inside queries."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from core.settings import get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")


# A pooled connection idle this long is pinged before reuse. A ping on every checkout (`pool_pre_ping`)
# would add a round trip to every statement of the hot paths, whose connections go back and forth in
# milliseconds; a connection that died under one in use fails that statement, and SQLAlchemy then drops
# every connection pooled before it, so a Postgres restart costs at most the statements in flight.
PING_AFTER_IDLE_SECONDS = 1.0


def ping_when_idle(engine: Engine) -> Engine:
    """Ping a connection on checkout only when it sat in the pool for `PING_AFTER_IDLE_SECONDS` or more."""

    @event.listens_for(engine, "connect")
    def _connected(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("checked_in", 0.0) < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool's documented signal: drop this connection and check out a fresh one instead.
            raise DisconnectionError(f"pooled connection is dead: {exc}") from exc

    return engine


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    url = get_settings().resolved_database_url()
    return ping_when_idle(create_engine(url, pool_size=10, max_overflow=30, pool_recycle=1800))


@lru_cache(maxsize=1)
def relaxed_engine() -> Engine:
    """Autocommit connections whose commits skip the WAL flush: for single statements on hot paths.

    Every request looks up its API key, and every online inference request its model and then its row, a
    few hundred times a second; a BEGIN/ROLLBACK round trip around each read, or waiting for the disk
    (about 10 ms here) after each inference row's write, would dominate the request's cost. Each statement
    stays atomic; only a Postgres crash within a fraction of a second after a write could lose it, while a
    caller that waited already has its answer from Redis. Only inference rows are written through it: jobs
    and everything else keep durable commits on `get_engine()`.
    """
    url = get_settings().resolved_database_url()
    return ping_when_idle(create_engine(url, pool_size=10, max_overflow=30, pool_recycle=1800,
                                         isolation_level="AUTOCOMMIT",
                                         connect_args={"options": "-c synchronous_commit=off"}))


@lru_cache(maxsize=1)
def session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def transaction() -> Iterator[Session]:
    """A session whose work commits on success and rolls back on error."""
    session = session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def current_revision(conn: Connection) -> str | None:
    """The Alembic revision the database is migrated to."""
    revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return None if revision is None else str(revision)


def reset_engine() -> None:
    """Drop pooled connections; a forked worker child must not share its parent's sockets."""
    for engine in (get_engine, relaxed_engine):
        if engine.cache_info().currsize:
            engine().dispose(close=False)
        engine.cache_clear()
    session_factory.cache_clear()


def unreachable(exc: BaseException) -> bool:
    """True for errors that mean Postgres could not be reached (or the connection dropped), not bad SQL."""
    return isinstance(exc, DBAPIError) and (exc.connection_invalidated or type(exc.orig).__name__ in (
        "OperationalError", "InterfaceError"))


def when_reachable(work: Callable[[], T], what: str, timeout: float) -> T:
    """Run ``work`` (which opens its own transactions), retrying while Postgres is unreachable, up to ``timeout``.

    Worker-side writes that must not be lost (a finished job's outcome, a checkpoint record) wait out a
    database restart instead of failing the job that produced them.
    """
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        try:
            return work()
        except DBAPIError as exc:
            if not unreachable(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unreachable; retrying in %.1f s", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
