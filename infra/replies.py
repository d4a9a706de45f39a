"""The fast path for online inference answers: one reply list per request on the broker's Redis.

The worker writes the answer to Postgres (the truth, for polls) and pushes a copy here; the API blocks on
the list instead of polling the database. With a non-Redis broker, callers fall back to the row.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import redis
import redis.asyncio

from core.settings import get_settings

REPLY_TTL_SECONDS = 300
# Callers one API process lets wait for their answers at once; Redis serves 10,000 clients by default.
MAX_WAITING_CALLERS = 4096


def _key(request_id: str) -> str:
    return f"llmos:reply:{request_id}"


def stream_key(request_id: str) -> str:
    """The list a streamed request's text goes to as it grows, chunk by chunk, before its reply."""
    return f"llmos:stream:{request_id}"


def _redis_url() -> str | None:
    """The broker's URL when it is a Redis (the reply lists live there), else None."""
    url = get_settings().resolved_broker_url()
    return url if url.startswith(("redis://", "rediss://", "unix://")) else None


# No read timeout: BLPOP itself bounds the wait, and a socket timeout below it would cut it short.
_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 3, "socket_timeout": None, "health_check_interval": 30}


def _answer(item: Any) -> dict[str, Any] | None:
    """The answer a BLPOP returned (None when it timed out)."""
    if item is None:
        return None
    result: dict[str, Any] = json.loads(item[1])
    return result


@lru_cache(maxsize=1)
def client() -> redis.Redis | None:
    url = _redis_url()
    return None if url is None else redis.Redis.from_url(url, **_OPTIONS)


def push_replies(replies: list[tuple[str, dict[str, Any]]]) -> None:
    """Push each (request ID, answer) to its caller's list, all in one round trip."""
    conn = client()
    if conn is None or not replies:
        return
    pipe = conn.pipeline(transaction=False)
    for request_id, payload in replies:
        pipe.rpush(_key(request_id), json.dumps(payload))
        pipe.expire(_key(request_id), REPLY_TTL_SECONDS)
    pipe.execute()


def push_chunks(chunks: list[tuple[str, dict[str, Any]]]) -> None:
    """Append each (stream key, chunk) to its stream, all in one round trip."""
    conn = client()
    if conn is None or not chunks:
        return
    pipe = conn.pipeline(transaction=False)
    for key in dict.fromkeys(key for key, _ in chunks):
        pipe.rpush(key, *[json.dumps(chunk) for k, chunk in chunks if k == key])
        pipe.expire(key, REPLY_TTL_SECONDS)
    pipe.execute()


def wait_reply(request_id: str, timeout: float) -> dict[str, Any] | None:
    """Block up to ``timeout`` seconds for the answer; None when it did not come in time."""
    conn = client()
    if conn is None or timeout <= 0:
        return None
    # BLPOP takes whole or fractional seconds; 0 would mean forever.
    return _answer(conn.blpop([_key(request_id)], timeout=max(timeout, 0.01)))


@lru_cache(maxsize=1)
def async_client() -> redis.asyncio.Redis | None:
    """The API's client: a waiting caller suspends on its BLPOP and holds a Redis connection, not a thread."""
    url = _redis_url()
    # Each waiting caller holds one connection in BLPOP: the pool must hold as many as callers may wait at
    # once (redis-py's default of 100 answered the 101st waiter with an error, and it got the handle at once).
    return None if url is None else redis.asyncio.Redis.from_url(url, max_connections=MAX_WAITING_CALLERS,
                                                                 **_OPTIONS)


async def wait_reply_async(request_id: str, timeout: float) -> dict[str, Any] | None:
    """`wait_reply` for a coroutine."""
    conn = async_client()
    if conn is None or timeout <= 0:
        return None
    return _answer(await conn.blpop([_key(request_id)], timeout=max(timeout, 0.01)))


async def next_streamed(request_id: str, timeout: float) -> tuple[str, dict[str, Any]] | None:
    """The next item of a streamed request: ("chunk", text) or, after its last chunk, ("reply", answer).

    Both lists in one BLPOP, the stream first: the worker pushes every chunk before the reply, so a chunk is
    never read after the reply. None when nothing came within `timeout` seconds.
    """
    conn = async_client()
    if conn is None:
        return None
    item = await conn.blpop([stream_key(request_id), _key(request_id)], timeout=max(timeout, 0.01))
    if item is None:
        return None
    key = item[0].decode() if isinstance(item[0], bytes) else item[0]
    return ("chunk" if key == stream_key(request_id) else "reply"), json.loads(item[1])
