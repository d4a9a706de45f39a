"""Experiment trackers a job reports to, from its `integrations`: MLflow.

A tracker logs from a thread of its own: a slow or unreachable tracking server never slows a training step,
and its failure never fails the job (it is reported once, as a warning event). The run is created when an
attempt starts, its id is kept on the job's integration entry, and a later attempt (a resume after a lost
worker, a pause or a hand-back) logs to the same run. The run ends with the job: FINISHED with the final
metrics and the model's files as artifacts, FAILED, or KILLED when cancelled.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.settings import get_settings

log = logging.getLogger(__name__)

# How long the end of a job waits for the tracker to send what it holds (the model's files included).
FINISH_TIMEOUT_SECONDS = 300.0
_STOP = object()


class MlflowTracker:
    """One job's MLflow run, fed by the job's reporter (`metrics`) and ended by its outcome (`finish`)."""

    def __init__(self, job_id: str, config: dict[str, Any], params: dict[str, Any], *,
                 on_run: Callable[[str], None], on_error: Callable[[str], None]) -> None:
        self.job_id = job_id
        self.config = config
        self._params = params
        self._on_run = on_run
        self._on_error = on_error
        self._run_id: str | None = config.get("run_id")
        self._failed = False
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"mlflow-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._queue.put(("start",))

    def metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._queue.put(("metrics", step, dict(metrics)))

    def finish(self, status: str, metrics: dict[str, Any] | None = None, model_dir: Path | None = None) -> None:
        """End the run (``status``: FINISHED, FAILED or KILLED), waiting a bounded time for it to be sent."""
        self._queue.put(("finish", status, dict(metrics or {}), model_dir))
        self._queue.put(_STOP)
        self._thread.join(FINISH_TIMEOUT_SECONDS)

    def stop(self) -> None:
        """This attempt ends without ending the job (paused, handed back): the run stays open for the next."""
        self._queue.put(_STOP)
        self._thread.join(30)

    def _work(self) -> None:
        # MLflow's defaults retry a request 7 times over minutes, with a 120 s timeout each: a tracking server
        # that is down would hold the end of the job that long. An operator's own settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.config["tracking_uri"])
        while (item := self._queue.get()) is not _STOP:
            if self._failed:
                continue  # drained, not sent: one failure is reported and the rest of the run is skipped
            try:
                getattr(self, f"_{item[0]}")(client, *item[1:])
            except Exception as exc:
                self._failed = True
                log.warning("job %s: MLflow logging failed", self.job_id, exc_info=True)
                self._on_error(f"MLflow logging failed ({type(exc).__name__}: {str(exc)[:300]}); training goes on "
                               "without it")

    def _start(self, client: Any) -> None:
        from mlflow.entities import Param

        if self._run_id is not None:
            client.update_run(self._run_id, status="RUNNING")
            return
        name = self.config.get("experiment") or "llmos"
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = client.create_experiment(name, artifact_location=_artifact_location(self.config, name))
        tags = {**(self.config.get("tags") or {}), "llmos.job_id": self.job_id}
        run = client.create_run(experiment_id, run_name=self.config.get("run_name") or self.job_id, tags=tags)
        self._run_id = run.info.run_id
        self._on_run(run.info.run_id)
        client.log_batch(self._run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(self._params.items())])

    def _metrics(self, client: Any, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        found = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)]
        if found and self._run_id is not None:
            client.log_batch(self._run_id, metrics=found)

    def _finish(self, client: Any, status: str, metrics: dict[str, Any], model_dir: Path | None) -> None:
        from mlflow.entities import Metric

        if self._run_id is None:
            return
        now = int(time.time() * 1000)
        final = [Metric(f"final/{k}", float(v), now, 0) for k, v in _flat(metrics).items()]
        if final:
            client.log_batch(self._run_id, metrics=final)
        if model_dir is not None and model_dir.is_dir():
            client.log_artifacts(self._run_id, str(model_dir), "model")
        client.set_terminated(self._run_id, status)


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested metrics (per-entity NER scores), keyed by their path."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def _artifact_location(config: dict[str, Any], experiment: str) -> str | None:
    """For a local `sqlite:` store, artifacts beside it under `LLMOS_MLFLOW_LOCAL_ROOT`; a tracking server
    chooses its own."""
    root = get_settings().mlflow_local_root
    if not str(config["tracking_uri"]).startswith("sqlite:") or root is None:
        return None
    return (Path(root) / "artifacts" / experiment).resolve().as_uri()


def start_trackers(job_id: str, entries: list[dict[str, Any]], params: dict[str, Any]) -> list[MlflowTracker]:
    """A started tracker for each of the job's integrations (none when it has none)."""
    import importlib.util

    trackers: list[MlflowTracker] = []
    for index, entry in enumerate(entries):
        if entry.get("type") != "mlflow":
            continue
        if importlib.util.find_spec("mlflow") is None:
            _warn(job_id, "MLflow logging skipped: this worker has no MLflow client (pip install mlflow-skinny)")
            continue
        tracker = MlflowTracker(job_id, dict(entry["mlflow"]), params,
                                on_run=functools.partial(_note_run, job_id, index),
                                on_error=functools.partial(_warn, job_id))
        tracker.start()
        trackers.append(tracker)
    return trackers


def end_trackers(job_id: str, trackers: list[MlflowTracker], model_dir: Path | None) -> None:
    """End each run as the job ended (FINISHED with its metrics and model, FAILED, KILLED), or leave it open
    for the job's next attempt."""
    if not trackers:
        return
    from db import jobs as jobs_repo
    from db.session import transaction
    from domain import jobs

    try:
        with transaction() as session:
            job = jobs_repo.get_job_by_id(session, job_id)
            status, metrics = (job.status, dict(job.metrics or {})) if job is not None else (jobs.FAILED, {})
    except Exception:
        # Postgres away: the runs stay open, as for an attempt that ends without ending the job.
        log.warning("job %s: could not read its outcome for its trackers", job_id, exc_info=True)
        status, metrics = jobs.RUNNING, {}
    ending = {jobs.SUCCEEDED: "FINISHED", jobs.FAILED: "FAILED", jobs.CANCELLED: "KILLED"}.get(status)
    for tracker in trackers:
        if ending is None:
            tracker.stop()
        else:
            tracker.finish(ending, metrics, model_dir if ending == "FINISHED" else None)


def _note_run(job_id: str, index: int, run_id: str) -> None:
    from db.session import transaction
    from domain import jobs

    with transaction() as session:
        jobs.note_integration_run(session, job_id, index, run_id)


def _warn(job_id: str, message: str) -> None:
    from db import jobs as jobs_repo
    from db.session import transaction
    from domain import jobs

    try:
        with transaction() as session:
            job = jobs_repo.get_job_by_id(session, job_id)
            if job is not None:
                jobs.add_job_event(session, job, message, level="warn")
    except Exception:
        log.warning("job %s: %s (and the event could not be written)", job_id, message, exc_info=True)
