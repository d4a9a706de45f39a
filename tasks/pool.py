"""The workers' process pool: a pool process that ends after its task is replaced within a moment.

Training runs one task per pool process (`--max-tasks-per-child=1`, so CUDA memory goes back with the
process). Celery's pool notices the exit when the process's sentinel closes, but the process is often
not yet reapable then, so no replacement starts until the pool's periodic check, every 5 s: a job
submitted to an idle worker waited 0.3-5 s (median 4 s in `bench/lifecycle.py`) before it ran. Checking
every 0.2 s instead costs a `waitpid` per pool process each time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool

REFILL_CHECK_SECONDS = 0.2


class PromptRefillAsynPool(AsynPool):
    @property
    def timers(self) -> dict[Callable[..., Any], float]:
        return {self.maintain_pool: REFILL_CHECK_SECONDS}


class PromptRefillPool(TaskPool):
    """Celery's prefork pool, replacing exited pool processes within `REFILL_CHECK_SECONDS`."""

    Pool = PromptRefillAsynPool
