"""Engine and sessions. Transactions are committed at the boundary (request or task), never inside queries."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TypeVar

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from domain.settings import get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    url = get_settings().resolved_database_url()
    # pre_ping: a Postgres restart must not leave dead pooled connections behind.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=30, pool_recycle=1800)


@lru_cache(maxsize=1)
def relaxed_engine() -> Engine:
    """Autocommit connections whose commits skip the WAL flush: for online inference rows only.

    An inference row is written a few hundred times a second, one statement at a time; waiting for the
    disk (about 10 ms here) and a BEGIN/COMMIT round trip each would dominate a request's cost. The
    statement stays atomic; only a Postgres crash within a fraction of a second after it could lose it,
    while a caller that waited already has its answer from Redis. Jobs and everything else keep durable
    commits on `get_engine()`.
    """
    url = get_settings().resolved_database_url()
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=30, pool_recycle=1800,
                         isolation_level="AUTOCOMMIT", connect_args={"options": "-c synchronous_commit=off"})


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
