"""Per-tenant rate limits: a sliding-window counter in Redis, one round trip per check.

Each limit keeps one counter per fixed minute; the count in force is the current minute's plus the previous
minute's weighted by how much of it still lies inside the sliding 60 s (Cloudflare's "sliding window
counter": two integers per tenant and limit, and within a fraction of a percent of an exact moving window
on real traffic). The check, the increment and the figures for OpenAI's headers (remaining, time to reset,
time until the refused request would fit) come back from one Lua script, so a request pays one round trip.
Concurrent checks in one process share that round trip: whatever checks wait are sent as one pipeline, and
while it runs the next ones gather (redis-py's asyncio client spends ~130 us of CPU on a lone command, ~30 us
per command in a pipeline of 32; the GET it guards costs well under a millisecond).

Why not the `limits` package: its strategies answer "allowed?" in one call and "how many remain, when does
it reset" in a second (`hit` then `get_window_stats`), and every authenticated answer carries those headers;
two round trips on every request is what the hot path cannot afford.

When Redis cannot be reached the check lets the request through (logged, counted): the limiter protects
the service's fairness, and failing closed would turn a cache outage into a full outage.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis
import redis.asyncio

from core.settings import get_settings

log = logging.getLogger(__name__)

WINDOW_MS = 60_000

# KEYS[1]: the counter's prefix; ARGV: limit, window (ms), cost, mode ("hit" checks and counts only if the
# cost fits; "add" counts unconditionally: a correction after the real token count is known, maybe negative).
# Returns {allowed, used after this call, ms until `cost` more would fit (-1: never), ms until back to zero}.
# The time is Redis' own, so API processes on hosts with skewed clocks share one window.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, window, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local index = math.floor(now / window)
local elapsed = now - index * window
local current_key = KEYS[1] .. ':' .. index
local current = tonumber(redis.call('GET', current_key) or '0')
local previous = tonumber(redis.call('GET', KEYS[1] .. ':' .. (index - 1)) or '0')
local left = window - elapsed
local used = previous * left / window + current
local allowed = 0
if ARGV[4] == 'add' or used + cost <= limit then
  allowed = 1
  current = redis.call('INCRBY', current_key, cost)
  if current < 0 then
    current = 0
    redis.call('SET', current_key, 0)
  end
  redis.call('PEXPIRE', current_key, window * 2)
  used = previous * left / window + current
end
local room = limit - cost - current
local retry = 0
if cost > limit then
  retry = -1
elseif used + cost > limit then
  if room >= 0 then
    retry = left - room * window / previous
  else
    retry = left + window * (1 - (limit - cost) / current)
  end
end
local reset = 0
if current > 0 then reset = left + window elseif previous > 0 then reset = left end
return {allowed, math.ceil(used), math.ceil(retry), math.ceil(reset)}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float
    # Seconds until the refused request would fit; None when it never can (it alone exceeds the limit).
    retry_after: float | None

    def headers(self, unit: str) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` trio for ``unit`` (`requests` or `tokens`)."""
        return {f"x-ratelimit-limit-{unit}": str(self.limit),
                f"x-ratelimit-remaining-{unit}": str(self.remaining),
                f"x-ratelimit-reset-{unit}": duration(self.reset_seconds)}


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``250ms``, ``1s``, ``1m30s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def _redis_url() -> str | None:
    settings = get_settings()
    if settings.rate_limit_redis_url:
        return settings.rate_limit_redis_url
    url = settings.resolved_broker_url()
    return url if url.startswith(("redis://", "rediss://", "unix://")) else None


@lru_cache(maxsize=1)
def _client() -> redis.asyncio.Redis | None:
    url = _redis_url()
    if url is None:
        log.warning("no Redis for rate limits (the broker is not Redis and LLMOS_RATE_LIMIT_REDIS_URL is unset): "
                    "requests are not rate limited")
        return None
    # Short timeouts: a stalled Redis must cost a request milliseconds, not the client's patience.
    return redis.asyncio.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1, max_connections=512)


_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()
# At most this many checks share one pipeline.
MAX_PIPELINE = 256

Check = tuple[str, int, int, str, int]  # key, limit, cost, mode, window (ms)


class _Checks:
    """Concurrent checks of one event loop, sent together: no window, whatever waits goes at once."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self._pending: list[tuple[Check, asyncio.Future[list[int]]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def run(self, check: Check) -> list[int]:
        future: asyncio.Future[list[int]] = self.loop.create_future()
        self._pending.append((check, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = self.loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_PIPELINE], self._pending[MAX_PIPELINE:]
            try:
                results = await self._send([check for check, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _send(self, checks: list[Check]) -> list[Any]:
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for key, limit, cost, mode, window in checks:
                pipe.evalsha(_SCRIPT_SHA, 1, key, limit, window, cost, mode)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                # A Redis that restarted (or never saw us) has lost the script: load it and send again.
                await self.client.script_load(_SCRIPT)
                continue
            return results
        raise AssertionError("unreachable")


_checks: _Checks | None = None
_last_warning = 0.0


def _checker() -> _Checks | None:
    global _checks
    client = _client()
    if client is None:
        return None
    if _checks is None or _checks.loop is not asyncio.get_running_loop():
        _checks = _Checks(client)
    return _checks


async def _run(key: str, limit: int, cost: int, mode: str, window_ms: int = WINDOW_MS) -> Decision | None:
    checker = _checker()
    if checker is None:
        return None
    try:
        allowed, used, retry_ms, reset_ms = await checker.run((key, limit, cost, mode, window_ms))
    except (redis.RedisError, OSError):
        global _last_warning
        if time.monotonic() - _last_warning > 60:
            _last_warning = time.monotonic()
            log.warning("rate limits unavailable (Redis unreachable); letting requests through", exc_info=True)
        return None
    return Decision(allowed=bool(allowed), limit=limit, remaining=max(0, limit - int(used)),
                    reset_seconds=int(reset_ms) / 1000,
                    retry_after=None if int(retry_ms) < 0 else int(retry_ms) / 1000)


async def hit(tenant_id: str, kind: str, limit: int, cost: int = 1, window_ms: int = WINDOW_MS) -> Decision | None:
    """Count ``cost`` against the tenant's ``kind`` limit (`rpm`, `tpm`) if it fits; None when Redis is away.

    ``window_ms`` is a minute for every limit the service enforces; tests shorten it to see a window pass."""
    return await _run(f"llmos:rl:{tenant_id}:{kind}:{window_ms}", limit, cost, "hit", window_ms)


async def adjust(tenant_id: str, kind: str, limit: int, delta: int) -> None:
    """Correct an estimate once the real cost is known (``delta`` may be negative)."""
    if delta:
        await _run(f"llmos:rl:{tenant_id}:{kind}:{WINDOW_MS}", limit, delta, "add")


async def close() -> None:
    global _checks
    client = _client()
    if client is not None:
        await client.aclose()
    _client.cache_clear()
    _checks = None
