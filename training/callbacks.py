"""How the training loop reports progress and learns that it must stop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

# cancel: stop, keep nothing; pause / shutdown / time_limit: checkpoint first, so a later run can resume
# and a job stopped at its runtime limit still leaves its last state behind; lost: another run owns the
# job now, so write nothing into it.
StopReason = Literal["cancel", "pause", "shutdown", "time_limit", "lost"]


@dataclass
class StepState:
    """Progress after one optimizer step."""

    step: int
    total_steps: int
    epoch: float
    train_loss: float
    learning_rate: float
    samples_per_second: float


class TrainingCallbacks(Protocol):
    """What the training loop calls; the tasks layer implements it (events, DB, cancel flags)."""

    def on_step(self, state: StepState) -> None:
        """Called after every optimizer step."""
        ...

    def on_log(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        """Called about a hundred times a run with train_loss (averaged since the last call) and
        learning_rate: the points of a loss curve between epoch ends."""
        ...

    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        """Called at each epoch end with train_loss, learning_rate, eval_loss and eval_* metrics."""
        ...

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """Called once a checkpoint directory is complete on disk."""
        ...

    def should_stop(self) -> StopReason | None:
        """Read at every step boundary; a reason stops the run there."""
        ...


class NullCallbacks:
    """Callbacks that ignore everything and never stop."""

    def on_step(self, state: StepState) -> None:
        """Ignore a step."""

    def on_log(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        """Ignore a loss-curve point."""

    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        """Ignore an evaluation."""

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """Ignore a checkpoint."""

    def should_stop(self) -> StopReason | None:
        """Never stop."""
        return None
