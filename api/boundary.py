"""The request's unit of work: services run in one transaction, committed here, and their tasks sent after.

Services are synchronous functions of a `Session` (the workers call the same ones); `transaction` and `read`
run them on the asyncio driver through the greenlet bridge, so the request holds no thread while Postgres
answers, and holds its connection only for the statements themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from db import aio
from domain import dispatch

T = TypeVar("T")


async def transaction(work: Callable[..., T], /, **kwargs: Any) -> T:
    """Run ``work(session, **kwargs)`` and commit; then send the tasks it staged (never when it raised)."""
    async with aio.sessions()() as session:
        result = await session.run_sync(work, **kwargs)
        staged = dispatch.take_staged(session.sync_session)
        await session.commit()
    if staged:
        # Kombu's publish is blocking I/O; a worker thread keeps it off the event loop for its few milliseconds.
        await anyio.to_thread.run_sync(dispatch.publish_all, staged)
    return result


async def read(work: Callable[..., T], /, **kwargs: Any) -> T:
    """Run ``work(session, **kwargs)`` on an autocommit connection: each statement is one round trip."""
    async with aio.read_sessions()() as session:
        return await session.run_sync(work, **kwargs)
