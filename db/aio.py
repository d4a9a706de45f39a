"""The API's database access: the same models and repositories as the workers, on an asyncio driver.

Repositories and services are written once, against a synchronous `Session` or `Connection`; the API runs
them through SQLAlchemy's greenlet bridge (`AsyncSession.run_sync`), so a statement's wait for Postgres
suspends the request's coroutine on asyncpg instead of holding a thread, while the code stays the code
the Celery workers run on psycopg2.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from core.settings import get_settings
from db.session import ping_when_idle

# Connections per API process, all kept open: a request beyond them waits (on the event loop) for one
# to come back. No overflow: a connection opened past the pool and closed on return costs Postgres a new
# backend process each time (a profile at concurrency 32 showed a tenth of the API's time connecting),
# and Postgres' default max_connections (100) is shared by every API and worker process.
POOL_SIZE = 10
MAX_OVERFLOW = 0
RELAXED_POOL_SIZE = 4
# The most Postgres connections one API process holds.
CONNECTIONS = POOL_SIZE + RELAXED_POOL_SIZE


def _async_url() -> str:
    url = make_url(get_settings().resolved_database_url())
    return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def _create(**options: Any) -> AsyncEngine:
    options = {"pool_size": POOL_SIZE, "max_overflow": MAX_OVERFLOW, **options}
    engine = create_async_engine(_async_url(), pool_recycle=1800, **options)
    ping_when_idle(engine.sync_engine)
    return engine


@lru_cache(maxsize=1)
def engine() -> AsyncEngine:
    """Transactional connections: for the writes of a request, committed at its end."""
    return _create()


@lru_cache(maxsize=1)
def autocommit_engine() -> AsyncEngine:
    """Autocommit connections for reads: a simple GET is one round trip, with no BEGIN or ROLLBACK around it.

    The same pool as `engine()`: with asyncpg the isolation level is the driver's choice of sending BEGIN,
    so switching it costs no round trip.
    """
    return engine().execution_options(isolation_level="AUTOCOMMIT")


@lru_cache(maxsize=1)
def relaxed_engine() -> AsyncEngine:
    """`db.session.relaxed_engine`'s twin: autocommit, and commits that skip the WAL flush (inference rows only)."""
    return _create(isolation_level="AUTOCOMMIT", connect_args={"server_settings": {"synchronous_commit": "off"}},
                   pool_size=RELAXED_POOL_SIZE)


@lru_cache(maxsize=1)
def sessions() -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine(), expire_on_commit=False)


@lru_cache(maxsize=1)
def read_sessions() -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(autocommit_engine(), expire_on_commit=False)


async def dispose() -> None:
    """Close pooled connections (at shutdown, or before a forked process would share their sockets)."""
    for cached in (engine, relaxed_engine):
        if cached.cache_info().currsize:
            await cached().dispose()
        cached.cache_clear()
    autocommit_engine.cache_clear()
    sessions.cache_clear()
    read_sessions.cache_clear()
