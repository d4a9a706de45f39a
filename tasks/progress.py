"""The bridge from a training loop to the job row: progress, metrics, checkpoints, heartbeats, flags."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from core.clock import utcnow
from db import jobs as jobs_repo
from db.session import transaction, unreachable, when_reachable
from domain import jobs, storage
from domain.events import emit_event
from training.callbacks import StepState, StopReason

log = logging.getLogger(__name__)

# How long a worker waits out a database outage before a write it must not lose fails the attempt (the
# reconciler then requeues the job, and the next attempt resumes from the checkpoint on disk).
OUTAGE_WAIT_SECONDS = 600.0
# Loss-curve points kept while the database is unreachable; a run logs about a hundred.
MAX_PENDING_POINTS = 1000


def hard_limit_grace(runtime_limit: float) -> float:
    """Time a step gets past the runtime limit to reach its boundary and checkpoint: 10%, 30 s to 10 min."""
    return min(max(0.1 * runtime_limit, 30.0), 600.0)


class JobReporter:
    """Implements the training callbacks for one claimed attempt of one job.

    A heartbeat thread records liveness and reads the cancel/pause flags, so a training step never
    waits on the database; the loop reads the flags it cached at each step boundary.
    """

    def __init__(self, job_id: str, attempt: int, model_name: str, *, heartbeat_seconds: float,
                 progress_event_seconds: float, runtime_left: float | None = None) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.model_name = model_name
        self._heartbeat_seconds = heartbeat_seconds
        self._progress_event_seconds = progress_event_seconds
        self._stop_reason: StopReason | None = None
        self._lost = False
        self._last_row_write = 0.0
        self._last_event = 0.0
        self._last_epoch = 0
        # Loss-curve points waiting for the next progress write, which records them in its transaction.
        self._points: list[tuple[int, float, dict[str, float]]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)
        self.shutdown_requested = threading.Event()
        started = time.monotonic()
        # Soft limit: stop at the next step boundary with a checkpoint. Hard limit: a step that does not
        # return within the grace after it is not going to; the attempt is failed and its process ended.
        self._soft_deadline = None if runtime_left is None else started + runtime_left
        self._hard_deadline = None if runtime_left is None else started + runtime_left + hard_limit_grace(runtime_left)
        self.on_hard_limit: Any = None
        # Experiment trackers (`tasks.integrations`) that receive every logged and evaluated metric.
        self.trackers: list[Any] = []

    # lifecycle
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    @property
    def lost(self) -> bool:
        """True when another attempt took the job over: this one must stop without writing results."""
        return self._lost

    def _beat(self) -> None:
        while not self._done.wait(self._heartbeat_seconds):
            self.poll_flags()
            if self._hard_deadline is not None and time.monotonic() > self._hard_deadline and self.on_hard_limit:
                self.on_hard_limit()

    def poll_flags(self) -> None:
        try:
            with transaction() as session:
                flags = jobs_repo.heartbeat(session, self.job_id, self.attempt)
        except Exception:
            log.warning("heartbeat of %s failed; retrying", self.job_id, exc_info=True)
            return
        if flags is None:
            self._lost = True
            self._stop_reason = "lost"
            return
        cancel, pause, _status = flags
        if cancel:
            self._stop_reason = "cancel"
        elif pause:
            self._stop_reason = "pause"

    # training callbacks
    def should_stop(self) -> StopReason | None:
        if self._stop_reason is None and self.shutdown_requested.is_set():
            return "shutdown"
        if self._stop_reason is None and self._soft_deadline is not None and time.monotonic() > self._soft_deadline:
            return "time_limit"
        return self._stop_reason

    def on_log(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        # Written with the next progress row (at most one transaction a second), not one each: the points
        # are for the live chart, and an outage may drop the oldest rather than hold up training.
        self._points.append((step, epoch, metrics))
        del self._points[:-MAX_PENDING_POINTS]
        for tracker in self.trackers:
            tracker.metrics(step, metrics)

    def on_step(self, state: StepState) -> None:
        now = time.monotonic()
        epoch_end = int(state.epoch) > self._last_epoch and state.epoch == int(state.epoch)
        if not epoch_end and now - self._last_row_write < 1.0 and state.step != state.total_steps:
            return
        self._last_row_write = now
        emit = epoch_end or now - self._last_event >= self._progress_event_seconds
        if emit:
            self._last_event = now
        if epoch_end:
            self._last_epoch = int(state.epoch)
        self._write_progress(state, emit)

    def _write_progress(self, state: StepState, emit: bool) -> None:
        try:
            self._write_progress_row(state, emit)
        except Exception as exc:
            if not unreachable(exc):
                raise
            # Progress is refreshed at the next step; a database outage must not stop training.
            log.warning("progress of %s not written: database unreachable", self.job_id)

    def _write_progress_row(self, state: StepState, emit: bool) -> None:
        percent = round(100.0 * state.step / max(state.total_steps, 1), 1)
        progress = {"step": state.step, "total_steps": state.total_steps, "epoch": round(state.epoch, 3),
                    "percent": percent, "train_loss": round(state.train_loss, 5),
                    "learning_rate": state.learning_rate,
                    "samples_per_second": round(state.samples_per_second, 2)}
        with transaction() as session:
            job = jobs_repo.get_job_by_id(session, self.job_id)
            if job is None or not jobs.holds_claim(job, self.attempt):
                return
            job.progress = progress
            job.heartbeat_at = utcnow()
            if state.samples_per_second > 0 and 0 < state.step < state.total_steps and job.started_at:
                elapsed = (utcnow() - job.started_at).total_seconds()
                remaining = elapsed * (state.total_steps - state.step) / state.step
                job.estimated_finish = utcnow() + timedelta(seconds=remaining)
            if emit:
                emit_event(session, job.tenant_id, "fine_tuning.job.progress", jobs.job_object(job))
            for step, epoch, metrics in self._points:
                loss = metrics.get("train_loss")
                summary = f"training loss={loss:.4g}" if loss is not None else "no loss recorded"
                jobs.add_job_event(session, job, f"Step {step}/{state.total_steps}: {summary}", type_="metrics",
                                   data={"step": step, "epoch": round(epoch, 3), **metrics})
        self._points.clear()

    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.metrics(step, metrics)
        # Metrics events and checkpoint records are kept: training waits for the database to come back.
        when_reachable(lambda: self._record_metrics(step, epoch, metrics), f"metrics of {self.job_id}",
                       OUTAGE_WAIT_SECONDS)

    def _record_metrics(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        data: dict[str, Any] = {"step": step, "epoch": round(epoch, 3), **metrics}
        summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
        with transaction() as session:
            job = jobs_repo.get_job_by_id(session, self.job_id)
            if job is None:
                return
            jobs.add_job_event(session, job, f"Step {step}, epoch {epoch:.2f}: {summary}",
                               type_="metrics", data=data)

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        location = self._publish_checkpoint(step, path)
        from training.trainer import checkpoint_step

        # The checkpoints still on disk (the trainer prunes older ones): only those stay servable as models.
        kept = {s for p in path.parent.iterdir() if (s := checkpoint_step(p.name)) is not None}
        when_reachable(lambda: self._record_checkpoint(step, location, metrics, kept | {step}),
                       f"checkpoint of {self.job_id}", OUTAGE_WAIT_SECONDS)

    def _publish_checkpoint(self, step: int, path: Path) -> str:
        """Upload the checkpoint when artifacts live in object storage; its location (else its path)."""
        if self._lost:
            # Another attempt owns the job now; its checkpoints in the bucket are not this one's to replace.
            return str(path)
        try:
            return storage.publish_checkpoint(self.job_id, path)
        except Exception:
            # The checkpoint is still on this disk and the next one is uploaded in its turn: an object-store
            # hiccup costs at most a resume from an older step on another machine, not the job.
            log.warning("checkpoint at step %d of %s not uploaded", step, self.job_id, exc_info=True)
            return str(path)

    def _record_checkpoint(self, step: int, location: str, metrics: dict[str, Any], kept: set[int]) -> None:
        with transaction() as session:
            job = jobs_repo.get_job_by_id(session, self.job_id)
            if job is None or not jobs.holds_claim(job, self.attempt):
                return
            jobs.record_checkpoint(session, job, step=step, location=location, metrics=metrics,
                                   model_name=self.model_name, kept_steps=kept)
