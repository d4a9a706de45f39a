"""Per-tenant rate limits: a sliding-window counter in Redis, one round trip per check.

Each limit keeps one counter per fixed minute; the count in force is the current minute's plus the previous
minute's weighted by how much of it still lies inside the sliding 60 s (Cloudflare's "sliding window
counter": two integers per tenant and limit, and within a fraction of a percent of an exact moving window
on real traffic). The check, the increment and the figures for OpenAI's headers (remaining, time to reset,
time until the refused request would fit) come back from one Lua script, so a request pays one round trip.

Why not the `limits` package: its strategies answer "allowed?" in one call and "how many remain, when does
it reset" in a second (`hit` then `get_window_stats`), and every authenticated answer carries those headers;
two round trips on every request is what the hot path cannot afford.

When Redis cannot be reached the check lets the request through (logged, counted): the limiter protects
the service's fairness, and failing closed would turn a cache outage into a full outage.
"""

from __future__ import annotations

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


@lru_cache(maxsize=1)
def _script() -> Any:
    client = _client()
    return None if client is None else client.register_script(_SCRIPT)


_last_warning = 0.0


async def _run(key: str, limit: int, cost: int, mode: str, window_ms: int = WINDOW_MS) -> Decision | None:
    script = _script()
    if script is None:
        return None
    try:
        allowed, used, retry_ms, reset_ms = await script(keys=[key], args=[limit, window_ms, cost, mode])
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
    client = _client()
    if client is not None:
        await client.aclose()
    _client.cache_clear()
    _script.cache_clear()
