"""Engine and sessions. Transactions are committed at the boundary (request or task), never inside queries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from domain.settings import get_settings


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    url = get_settings().resolved_database_url()
    # pre_ping: a Postgres restart must not leave dead pooled connections behind.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=30, pool_recycle=1800)


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
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
    get_engine.cache_clear()
    session_factory.cache_clear()
