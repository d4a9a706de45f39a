"""How the CLI shows a fine-tuning job's progress: a bar redrawn in place on a terminal, plain lines elsewhere."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

# A job in one of these statuses changes no more: watching stops there.
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

# Off a terminal a line is printed per status change and per this many percentage points, so a CI log of a
# long job holds a few dozen lines rather than one per poll.
PLAIN_PERCENT_STEP = 5.0


@dataclass(frozen=True)
class Snapshot:
    """What one poll of a job shows: its status and, once training reports it, step, loss and ETA."""

    status: str
    percent: float
    step: int | None
    total_steps: int | None
    loss: float | None
    queue_position: int | None
    estimated_finish: int | None

    @classmethod
    def of(cls, job: dict[str, Any]) -> Snapshot:
        progress = job.get("progress") or {}
        default = 100.0 if job["status"] == "succeeded" else 0.0
        loss = progress.get("train_loss")
        return cls(status=job["status"], percent=float(progress.get("percent") or default),
                   step=progress.get("step"), total_steps=progress.get("total_steps"),
                   loss=float(loss) if isinstance(loss, int | float) else None,
                   queue_position=job.get("queue_position"), estimated_finish=job.get("estimated_finish"))

    @property
    def status_text(self) -> str:
        return f"queued (position {self.queue_position})" if self.queue_position else self.status

    def details(self, now: float) -> str:
        """Percent, step/total, loss and time left, as far as the job reports them."""
        parts = [f"{self.percent:5.1f}%"]
        if self.step is not None:
            parts.append(f"step {self.step}/{self.total_steps if self.total_steps is not None else '?'}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        # The API clears estimated_finish when the job ends; a stale one from a stopped job is not shown.
        if self.estimated_finish is not None and self.status == "running":
            left = max(0, int(self.estimated_finish - now))
            finish = datetime.fromtimestamp(self.estimated_finish, UTC).strftime("%H:%M:%S")
            parts.append(f"eta {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} (at {finish} UTC)")
        return "  ".join(parts)


class JobDisplay(Protocol):
    """Receives each poll of a job, then is closed once the job ends or watching stops."""

    def update(self, job: dict[str, Any]) -> None: ...

    def __enter__(self) -> JobDisplay: ...

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class PlainDisplay:
    """One line per status change or per PLAIN_PERCENT_STEP points of progress: for pipes and CI logs."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._status: str | None = None
        self._percent = 0.0

    def __enter__(self) -> PlainDisplay:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.out.flush()

    def update(self, job: dict[str, Any]) -> None:
        snap = Snapshot.of(job)
        moved = snap.percent - self._percent >= PLAIN_PERCENT_STEP
        if snap.status_text != self._status or moved:
            self.out.write(f"{snap.status_text:<12} {snap.details(time.time())}\n")
            self.out.flush()
            self._status, self._percent = snap.status_text, snap.percent


class TerminalDisplay:
    """A rich progress bar redrawn in place, with the status, step/total, percent, loss and ETA beside it."""

    def __init__(self, out: TextIO) -> None:
        # Imported here: only a terminal needs rich, and the other client commands start faster without it.
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self._progress: Progress = Progress(
            # markup off: the texts come from the API, and a "[" in one must not be read as rich's markup.
            TextColumn("{task.description:<12}", markup=False), BarColumn(bar_width=30, finished_style="green"),
            TextColumn("{task.fields[details]}", markup=False), console=Console(file=out), transient=False)
        self._task: TaskID | None = None

    def __enter__(self) -> TerminalDisplay:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Stopping draws the bar a last time and leaves it on screen, with the cursor on the next line.
        self._progress.stop()

    def update(self, job: dict[str, Any]) -> None:
        snap = Snapshot.of(job)
        # Until training reports steps the bar pulses (total None) rather than sitting at an empty 0%.
        total = 100.0 if snap.step is not None or snap.status in TERMINAL else None
        details = snap.details(time.time())
        if self._task is None:
            self._task = self._progress.add_task(snap.status_text, total=total, details=details)
        self._progress.update(self._task, description=snap.status_text, total=total, completed=snap.percent,
                              details=details)


def job_display(out: TextIO) -> JobDisplay:
    """The bar on a terminal, plain lines when `out` is a pipe or a file."""
    return TerminalDisplay(out) if out.isatty() else PlainDisplay(out)
