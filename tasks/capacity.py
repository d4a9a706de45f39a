"""What a training worker offers: how many data-parallel ranks one of its tasks may run, advertised in
Postgres for as long as the worker lives."""

from __future__ import annotations

import logging
import threading

from core.settings import get_settings
from db import jobs as jobs_repo
from db.session import transaction

log = logging.getLogger(__name__)


def worker_capacity() -> int:
    """Ranks one training task of this worker may run: `LLMOS_WORKER_PROCESSES`, else the GPUs shared among
    the worker's `train_concurrency` tasks (one GPU per rank), else 1."""
    settings = get_settings()
    if settings.worker_processes:
        return settings.worker_processes
    from training.distributed import available_processes

    return max(1, available_processes() // max(1, settings.train_concurrency))


def advertise_capacity(name: str, stop: threading.Event) -> None:
    """Keep this training worker's offer fresh in Postgres until ``stop`` is set, then withdraw it.

    Runs on a thread of the worker's main process, at the jobs' heartbeat cadence: a worker that dies stops
    refreshing, and after `stale_heartbeat_seconds` it no longer counts as offering anything.
    """
    settings = get_settings()
    capacity = worker_capacity()
    while True:
        try:
            with transaction() as session:
                if stop.is_set():
                    jobs_repo.forget_worker(session, name)
                    return
                jobs_repo.advertise_worker(session, name, capacity)
        except Exception as exc:
            if stop.is_set():
                return
            # Postgres away: the offer goes stale meanwhile, which is what an unreachable worker should show.
            log.warning("could not advertise training worker %s: %s", name, exc)
        stop.wait(settings.heartbeat_seconds)
