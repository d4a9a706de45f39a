"""The request's unit of work: services run in one transaction, committed here, and their tasks sent after.

Services are synchronous functions of a `Session` (the workers call the same ones); `transaction` and `read`
run them on the asyncio driver through the greenlet bridge, so the request holds no thread while Postgres
answers, and holds its connection only for the statements themselves.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from db import aio
from domain import dispatch
from infra import broker

T = TypeVar("T")


class Publisher:
    """Sends staged Celery tasks from one thread of its own, in the order they were committed.

    Kombu's publish is blocking I/O, so it runs off the event loop; one long-lived thread with its own
    producer connection costs less than a thread-pool hop per request, and concurrent requests' publishes
    never contend for kombu's producer pool. Callers wait until their tasks are sent (or the broker
    refused them: the rows are committed either way, and the reconciler re-sends what never arrived).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[list[dispatch.StagedTask], asyncio.AbstractEventLoop,
                                             asyncio.Future[None]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def publish(self, tasks: list[dispatch.StagedTask]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._ensure_thread()
        self._queue.put((tasks, loop, done))
        await done

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="task publisher", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            tasks, loop, done = self._queue.get()
            try:
                broker.publish_all(tasks)  # logs and swallows a broker failure: the reconciler re-sends
            finally:
                loop.call_soon_threadsafe(_resolve, done)


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


PUBLISHER = Publisher()


async def transaction(work: Callable[..., T], /, **kwargs: Any) -> T:
    """Run ``work(session, **kwargs)`` and commit; then send the tasks it staged (never when it raised)."""
    async with aio.sessions()() as session:
        result = await session.run_sync(work, **kwargs)
        staged = dispatch.take_staged(session.sync_session)
        await session.commit()
    if staged:
        await PUBLISHER.publish(staged)
    return result


async def read(work: Callable[..., T], /, **kwargs: Any) -> T:
    """Run ``work(session, **kwargs)`` on an autocommit connection: each statement is one round trip."""
    async with aio.read_sessions()() as session:
        return await session.run_sync(work, **kwargs)


async def read_rows(work: Callable[..., T], /, **kwargs: Any) -> T:
    """Run ``work(connection, **kwargs)`` on an autocommit connection, for Core reads that need no session."""
    async with aio.autocommit_engine().connect() as conn:
        return await conn.run_sync(work, **kwargs)
