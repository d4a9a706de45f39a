"""The response cache: deterministic inference answers kept in Redis, per tenant, so an identical request is
answered without queueing it or touching a model.

Keys. An entry is `llmos:rc:{tenant}:e:{digest}:{generation}`: the digest is SHA-256 of the endpoint and the
canonical request (model, inputs, every parameter), and the generation is the model's counter
(`llmos:rc:gen:{model}`), which `forget_model` bumps when the model is deleted: entries of the old
generation can no longer be found, whatever request was in flight when it happened.

Bounds. Each tenant has a byte budget (`LLMOS_RESPONSE_CACHE_BYTES`). Redis' own `maxmemory` eviction is
per instance, not per keyspace, and this Redis is the broker too, so the cache keeps its own books: a
sorted set of the tenant's entries by last use, a hash of their sizes and a byte counter, all changed by the
scripts below, atomically. A store evicts least recently used entries until the tenant fits; an entry
larger than an eighth of the budget is not kept (one huge answer must not flush all the others). Entries
also expire `LLMOS_RESPONSE_CACHE_SECONDS` after their last use; the books forget expired entries lazily
(they are the least recently used, so they go first), so the counter may overstate, never understate, what
the tenant holds. Sizes count the stored value, not Redis' per-key overhead (about 100 bytes more each).

A lookup is one round trip (a script: the generation, the entry, and on a hit its last-use time); when
Redis cannot be reached the cache answers "miss" and stores nothing: it saves work, it is never needed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
import redis
import redis.asyncio

from core.settings import get_settings

log = logging.getLogger(__name__)

PREFIX = "llmos:rc"
# An entry may take at most this share of its tenant's budget.
ENTRY_SHARE = 8

# KEYS: generation, entry prefix, index (zset: entry -> last use, microseconds: entries stored within one
# millisecond must still keep their order), sizes (hash), bytes (counter).
# ARGV: ttl (ms). Returns {generation, value or false}.
_LOOKUP = """
local generation = redis.call('GET', KEYS[1]) or '0'
local key = KEYS[2] .. ':' .. generation
local value = redis.call('GET', key)
if value then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local ttl = tonumber(ARGV[1])
  redis.call('ZADD', KEYS[3], 'XX', now, key)
  redis.call('PEXPIRE', key, ttl)
  for i = 3, 5 do redis.call('PEXPIRE', KEYS[i], ttl) end
end
return {generation, value}
"""

# KEYS: as _LOOKUP. ARGV: value, ttl (ms), budget (bytes), the generation the lookup saw.
# Returns 1 when stored, 0 when the model's generation moved on meanwhile (its answer is stale).
_STORE = """
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[4] then return 0 end
local key = KEYS[2] .. ':' .. ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl, budget, size = tonumber(ARGV[2]), tonumber(ARGV[3]), string.len(ARGV[1])
local function forget(entry)
  local old = tonumber(redis.call('HGET', KEYS[4], entry) or '0')
  redis.call('HDEL', KEYS[4], entry)
  redis.call('ZREM', KEYS[3], entry)
  if old > 0 then redis.call('DECRBY', KEYS[5], old) end
end
forget(key)
redis.call('SET', key, ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[3], now, key)
redis.call('HSET', KEYS[4], key, size)
local used = redis.call('INCRBY', KEYS[5], size)
while used > budget do
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)
  if #oldest == 0 or oldest[1] == key then break end
  forget(oldest[1])
  redis.call('DEL', oldest[1])
  used = tonumber(redis.call('GET', KEYS[5]) or '0')
end
for i = 3, 5 do redis.call('PEXPIRE', KEYS[i], ttl) end
return 1
"""


@dataclass(frozen=True)
class Entry:
    """What a lookup found: the model generation it saw, and the cached answer when there is one."""

    generation: str
    body: bytes | None = None
    # The answer's `usage.total_tokens`, for rate limits; None when the answer has no usage.
    tokens: int | None = None


def digest(endpoint: str, payload: dict[str, Any]) -> str:
    """The request's identity: its endpoint and every field the worker reads, keys sorted."""
    return hashlib.sha256(orjson.dumps([endpoint, payload], option=orjson.OPT_SORT_KEYS)).hexdigest()


def _keys(tenant_id: str, model_id: str, request_digest: str) -> list[str]:
    tenant = f"{PREFIX}:{tenant_id}"
    return [f"{PREFIX}:gen:{model_id}", f"{tenant}:e:{request_digest}", f"{tenant}:lru", f"{tenant}:sizes",
            f"{tenant}:bytes"]


def _redis_url() -> str | None:
    url = get_settings().resolved_broker_url()
    return url if url.startswith(("redis://", "rediss://", "unix://")) else None


# Short timeouts: a stalled Redis must cost a request a millisecond's worth of patience, not its answer.
_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 1, "socket_timeout": 1}


@lru_cache(maxsize=1)
def _async_client() -> redis.asyncio.Redis | None:
    url = _redis_url()
    return None if url is None else redis.asyncio.Redis.from_url(url, max_connections=512, **_OPTIONS)


@lru_cache(maxsize=1)
def _scripts() -> tuple[Any, Any] | None:
    client = _async_client()
    return None if client is None else (client.register_script(_LOOKUP), client.register_script(_STORE))


@lru_cache(maxsize=1)
def _client() -> redis.Redis | None:
    url = _redis_url()
    return None if url is None else redis.Redis.from_url(url, **_OPTIONS)


def enabled() -> bool:
    return get_settings().response_cache_bytes > 0 and _redis_url() is not None


_last_warning = 0.0


def _warn(what: str) -> None:
    global _last_warning
    if time.monotonic() - _last_warning > 60:
        _last_warning = time.monotonic()
        log.warning("response cache unavailable (%s); answering without it", what, exc_info=True)


def _ttl_ms() -> int:
    return max(1, int(get_settings().response_cache_seconds * 1000))


async def lookup(tenant_id: str, model_id: str, request_digest: str) -> Entry | None:
    """The tenant's cached answer to the request, in one round trip; None when the cache is off or away."""
    scripts = _scripts()
    if scripts is None or not enabled():
        return None
    try:
        generation, value = await scripts[0](keys=_keys(tenant_id, model_id, request_digest), args=[_ttl_ms()])
    except (redis.RedisError, OSError):
        _warn("lookup")
        return None
    generation = generation.decode() if isinstance(generation, bytes) else str(generation)
    if not value:
        return Entry(generation)
    head, _, body = bytes(value).partition(b"\n")
    return Entry(generation, body, None if head == b"-" else int(head))


async def store(tenant_id: str, model_id: str, request_digest: str, generation: str, body: bytes,
                tokens: int | None) -> bool:
    """Keep an answer under the generation its lookup saw; False when it was not kept (too big, stale, away)."""
    scripts = _scripts()
    budget = get_settings().response_cache_bytes
    value = f"{'-' if tokens is None else tokens}\n".encode() + body
    if scripts is None or budget <= 0 or len(value) > budget // ENTRY_SHARE:
        return False
    try:
        stored = await scripts[1](keys=_keys(tenant_id, model_id, request_digest),
                                  args=[value, _ttl_ms(), budget, generation])
    except (redis.RedisError, OSError):
        _warn("store")
        return False
    return bool(stored)


def forget_model(model_id: str) -> None:
    """Make every cached answer of the model unreachable (it was deleted): its generation moves on.

    The old entries are left to the tenants' least-recently-used eviction and their expiry: finding them
    would mean scanning the keyspace, and nothing can read them any more.
    """
    client = _client()
    if client is not None:
        client.incr(f"{PREFIX}:gen:{model_id}")


def generation(model_id: str) -> int:
    """The model's cache generation (0 until it is first deleted)."""
    client = _client()
    value = None if client is None else client.get(f"{PREFIX}:gen:{model_id}")
    return int(value or 0)


def tenant_bytes(tenant_id: str) -> int:
    """Bytes the tenant's cached answers take by the cache's books."""
    client = _client()
    value = None if client is None else client.get(f"{PREFIX}:{tenant_id}:bytes")
    return int(value or 0)


async def close() -> None:
    client = _async_client()
    if client is not None:
        await client.aclose()
    _async_client.cache_clear()
    _scripts.cache_clear()
