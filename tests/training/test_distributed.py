"""Data-parallel training in real processes (gloo on CPU): as one process trains, resumable at any process
count, stopping every rank at one step, and failing fast, with nothing left running, when a rank dies."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import Recorder, assert_same_weights, sentiment_rows
from tests.training.test_generation import color_rows
from training.base_models import BaseModelInfo
from training.batching import shard_rows
from training.callbacks import StepState
from training.classification import (
    ClassificationResult,
    ClassificationSpec,
    resolve_hyperparameters,
    train_classification,
)
from training.distributed import RankFailed, run_distributed
from training.generation import GenerationSpec, train_generation
from training.generation import resolve_hyperparameters as resolve_generation_hyperparameters
from training.trainer import latest_checkpoint

# 61 rows in batches of 5: per epoch, 12 steps whose shares are 3 and 2 rows and one step of a single row,
# where rank 1's share is empty. Equal shares would hide a wrong weighting of the ranks' gradients.
HP = {"learning_rate": 3e-3, "n_epochs": 3, "batch_size": 5}
STEPS = 39
# A launch costs seconds (two interpreters importing torch), training a fraction of that. A rank that dies
# must end the run far sooner than the collectives' timeout the tests set below.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)
FAIL_FAST_SECONDS = 30.0
# Two processes reduce each gradient as a weighted sum of two shares' gradients, a single one as one sum
# over the batch: the same numbers added in another order, so results differ by float32 rounding, about
# 1e-7 relative per step (losses here agreed to 3e-7 after 39 steps), never by a batch's worth.
ATOL = 1e-5


def make_spec(base: Path, work: Path) -> ClassificationSpec:
    return ClassificationSpec(
        base_model_dir=base,
        output_dir=work / "model",
        checkpoint_dir=work / "checkpoints",
        train_rows=sentiment_rows(61, seed=5, int_labels=True),
        eval_rows=sentiment_rows(20, seed=6, int_labels=True),
        hyperparameters=resolve_hyperparameters(HP, 61),
        seed=11,
    )


def train_and_record(
    spec: ClassificationSpec, callbacks: Any, *, resume_from: Path | None = None, device: torch.device | None = None
) -> ClassificationResult:
    """train_classification, plus a note of how each rank's run ended (the launcher returns rank 0's only)."""
    result = train_classification(spec, callbacks, resume_from=resume_from, device=device)
    outcome = result.outcome
    note = {"step": outcome.global_step, "completed": outcome.completed, "stop_reason": outcome.stop_reason}
    rank = int(os.environ.get("RANK", "0"))
    (spec.checkpoint_dir.parent / f"rank{rank}.json").write_text(json.dumps(note))
    return result


def fail_on_rank_1(
    spec: ClassificationSpec, callbacks: Any, *, resume_from: Path | None = None, device: torch.device | None = None
) -> ClassificationResult:
    """Rank 1 fails before training; rank 0 trains, so it waits in its first collective until it is killed."""
    if os.environ["RANK"] == "1":
        raise ValueError("rank 1 cannot train")
    return train_classification(spec, callbacks, resume_from=resume_from, device=device)


def rank_notes(work: Path) -> list[dict[str, Any]]:
    return [json.loads((work / f"rank{rank}.json").read_text()) for rank in range(2)]


def launch(spec: ClassificationSpec, callbacks: Any, resume_from: Path | None = None, **kwargs: Any) -> Any:
    return run_distributed(train_and_record, spec, 2, callbacks, resume_from=resume_from,
                           collective_timeout=COLLECTIVE_TIMEOUT, **kwargs)


def assert_close_weights(left_dir: Path, right_dir: Path) -> None:
    left, right = load_file(left_dir / "model.safetensors"), load_file(right_dir / "model.safetensors")
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        if name.endswith("attention.self.key.bias"):
            # No gradient reaches a key bias (softmax ignores a constant added to every score), so Adam turns
            # its float noise into steps: it drifts apart between any two runs, but stays near zero in both.
            assert tensor.abs().max() < 1e-3 and right[name].abs().max() < 1e-3, name
            continue
        assert torch.allclose(tensor, right[name], atol=ATOL, rtol=1e-4), name


def assert_same_run(got: ClassificationResult, want: ClassificationResult, atol: float) -> None:
    assert got.outcome.completed and got.model_dir is not None and want.model_dir is not None
    assert got.outcome.global_step == want.outcome.global_step == STEPS
    # Token counts are integers summed over the ranks' shares: exactly the single process's.
    assert got.outcome.trained_tokens == want.outcome.trained_tokens
    assert got.metrics == pytest.approx(want.metrics, abs=atol)
    assert [row["step"] for row in got.outcome.history] == [row["step"] for row in want.outcome.history]
    for got_row, want_row in zip(got.outcome.history, want.outcome.history, strict=True):
        assert got_row == pytest.approx(want_row, abs=atol)


def no_scratch_left(work: Path) -> bool:
    return not [p for p in work.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def dropout_free_bert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-bert without dropout, so two runs differ only in what their batches and arithmetic do: two ranks
    draw different dropout masks for their rows than one process draws for the whole batch."""
    path = tmp_path_factory.mktemp("dropout_free") / "tiny-bert"
    shutil.copytree(tiny_bert, path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def single(dropout_free_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ClassificationResult, Recorder]:
    """The single-process run every data-parallel run here must reproduce, with its per-step losses."""
    recorder = Recorder()
    work = tmp_path_factory.mktemp("single")
    return train_classification(make_spec(dropout_free_bert, work), recorder), recorder


def test_shards_cover_the_batch_once_in_order() -> None:
    for n_rows, world in [(5, 2), (1, 2), (7, 3), (8, 4), (0, 2)]:
        rows = list(range(n_rows))
        shares = [shard_rows(rows, rank, world) for rank in range(world)]
        assert [row for share in shares for row in share] == rows
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert len(shares[0]) == max(map(len, shares))
    # A pre-grouped batch (generation's dataset items) is shared out by its rows.
    assert shard_rows([["a", "b", "c"]], 0, 2) == ["a", "b"]
    assert shard_rows([["a", "b", "c"]], 1, 2) == ["c"]
    with pytest.raises(ValueError, match="rank 2"):
        shard_rows([1, 2], 2, 2)


def test_two_processes_train_as_one_does(
    dropout_free_bert: Path, tmp_path: Path, single: tuple[ClassificationResult, Recorder]
) -> None:
    reference, reference_steps = single
    spec = make_spec(dropout_free_bert, tmp_path)
    recorder = Recorder()
    result = launch(spec, recorder)
    assert_same_run(result, reference, ATOL)
    assert result.model_dir == spec.output_dir
    assert_close_weights(spec.output_dir, reference.model_dir or Path())
    # Only rank 0's callbacks reach the caller: each step, evaluation and checkpoint once, as one process.
    assert [s.step for s in recorder.steps] == list(range(1, STEPS + 1))
    assert [s.train_loss for s in recorder.steps] == pytest.approx(
        [s.train_loss for s in reference_steps.steps], abs=ATOL
    )
    assert [e[0] for e in recorder.evaluations] == [13, 26, 39]
    assert [c[0] for c in recorder.checkpoints] == [13, 26, 39]
    assert rank_notes(tmp_path) == [{"step": STEPS, "completed": True, "stop_reason": None}] * 2
    assert no_scratch_left(tmp_path)


def test_pause_in_two_processes_then_resume_in_one(
    dropout_free_bert: Path, tmp_path: Path, single: tuple[ClassificationResult, Recorder]
) -> None:
    spec = make_spec(dropout_free_bert, tmp_path)
    stopped = launch(spec, Recorder(stop_at=17, reason="pause"))
    assert not stopped.outcome.completed and stopped.outcome.stop_reason == "pause"
    # Rank 0 asked should_stop; rank 1 learnt its answer and stopped before the same step.
    assert rank_notes(tmp_path) == [{"step": 17, "completed": False, "stop_reason": "pause"}] * 2
    checkpoint = latest_checkpoint(spec.checkpoint_dir)
    assert checkpoint == stopped.outcome.checkpoint == spec.checkpoint_dir / "checkpoint-17"
    assert (checkpoint / "rng-rank1.pt").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["processes"] == 2

    second = Recorder()
    resumed = train_classification(spec, second, resume_from=checkpoint)
    assert second.steps[0].step == 18
    assert_same_run(resumed, single[0], ATOL)
    assert_close_weights(resumed.model_dir or Path(), single[0].model_dir or Path())


def test_pause_in_one_process_then_resume_in_two(
    dropout_free_bert: Path, tmp_path: Path, single: tuple[ClassificationResult, Recorder]
) -> None:
    spec = make_spec(dropout_free_bert, tmp_path)
    stopped = train_classification(spec, Recorder(stop_at=9, reason="shutdown"))
    assert stopped.outcome.checkpoint == spec.checkpoint_dir / "checkpoint-9"
    second = Recorder()
    resumed = launch(spec, second, resume_from=stopped.outcome.checkpoint)
    assert second.steps[0].step == 10
    assert_same_run(resumed, single[0], ATOL)
    assert_close_weights(resumed.model_dir or Path(), single[0].model_dir or Path())


def test_two_process_resume_is_exact_with_dropout(tiny_bert: Path, tmp_path: Path) -> None:
    # With dropout on, only each rank continuing its own random stream gives the same weights.
    whole = launch(make_spec(tiny_bert, tmp_path / "whole"), Recorder())
    spec = make_spec(tiny_bert, tmp_path / "paused")
    stopped = launch(spec, Recorder(stop_at=20, reason="pause"))
    resumed = launch(spec, Recorder(), resume_from=stopped.outcome.checkpoint)
    assert_same_run(resumed, whole, 1e-6)
    assert_same_weights(resumed.model_dir or Path(), whole.model_dir or Path())


def test_cancel_stops_every_rank_at_the_same_step(dropout_free_bert: Path, tmp_path: Path) -> None:
    spec = make_spec(dropout_free_bert, tmp_path)
    recorder = Recorder(stop_at=5, reason="cancel")
    result = launch(spec, recorder)
    assert result.outcome.stop_reason == "cancel" and result.model_dir is None
    assert len(recorder.steps) == 5 and recorder.checkpoints == []
    assert rank_notes(tmp_path) == [{"step": 5, "completed": False, "stop_reason": "cancel"}] * 2
    assert latest_checkpoint(spec.checkpoint_dir) is None


def test_two_processes_train_generation_as_one_does(
    base_models: dict[str, BaseModelInfo], tmp_path: Path
) -> None:
    # A causal LM's loss is a mean over labelled tokens, and one dataset item is a whole pre-grouped batch:
    # the ranks share out its rows and weigh their gradients by labelled tokens, not rows.
    base = tmp_path / "tiny-gpt2"
    shutil.copytree(base_models["tiny-gpt2"].path, base)
    config = json.loads((base / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    (base / "config.json").write_text(json.dumps(config))

    def spec(work: Path) -> GenerationSpec:
        rows = color_rows(6)
        hyperparameters = resolve_generation_hyperparameters(
            {"learning_rate": 3e-3, "n_epochs": 3, "batch_size": 5}, len(rows)
        )
        return GenerationSpec(base_model_dir=base, output_dir=work / "model", checkpoint_dir=work / "checkpoints",
                              train_rows=rows, eval_rows=color_rows(1), hyperparameters=hyperparameters, seed=0)

    single = train_generation(spec(tmp_path / "one"), Recorder())
    double = run_distributed(train_generation, spec(tmp_path / "two"), 2, Recorder(),
                             collective_timeout=COLLECTIVE_TIMEOUT)
    assert double.outcome.completed and double.outcome.global_step == single.outcome.global_step
    assert double.outcome.trained_tokens == single.outcome.trained_tokens
    # Perplexity is exp(loss): its rounding is relative.
    assert double.metrics == pytest.approx(single.metrics, rel=1e-5, abs=ATOL)
    for got, want in zip(double.outcome.history, single.outcome.history, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=ATOL)


class KillRank1(Recorder):
    """Callbacks that SIGKILL rank 1 after a step, as the OOM killer would."""

    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.at_step = at_step
        self.pids: list[int] = []
        self.killed_at: float | None = None

    def on_step(self, state: StepState) -> None:
        super().on_step(state)
        if state.step == self.at_step:
            os.kill(self.pids[1], signal.SIGKILL)
            self.killed_at = time.monotonic()


def test_a_killed_rank_fails_the_run_fast_and_leaves_no_process(dropout_free_bert: Path, tmp_path: Path) -> None:
    killer = KillRank1(at_step=3)
    with pytest.raises(RankFailed) as failure:
        launch(make_spec(dropout_free_bert, tmp_path), killer, on_start=killer.pids.extend)
    assert killer.killed_at is not None
    assert time.monotonic() - killer.killed_at < FAIL_FAST_SECONDS
    assert (failure.value.rank, failure.value.exitcode) == (1, -signal.SIGKILL)
    assert "rank 1 of 2 was killed by SIGKILL" in str(failure.value)
    assert len(killer.steps) < STEPS
    assert_no_process_left(killer.pids)
    assert no_scratch_left(tmp_path)


def test_an_error_in_one_rank_is_raised_in_the_caller(dropout_free_bert: Path, tmp_path: Path) -> None:
    pids: list[int] = []
    with pytest.raises(ValueError, match="rank 1 cannot train") as failure:
        run_distributed(fail_on_rank_1, make_spec(dropout_free_bert, tmp_path), 2, Recorder(),
                        collective_timeout=COLLECTIVE_TIMEOUT, on_start=pids.extend)
    cause = failure.value.__cause__
    assert isinstance(cause, RankFailed) and (cause.rank, cause.exitcode) == (1, 1)
    assert "ValueError: rank 1 cannot train" in cause.remote_traceback
    assert "raised on training rank 1 of 2 (exited with code 1)" in (failure.value.__notes__ or [])
    assert_no_process_left(pids)


class FailingCallbacks(Recorder):
    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        raise ConnectionError("the database went away")


def test_a_callback_error_ends_every_rank(dropout_free_bert: Path, tmp_path: Path) -> None:
    pids: list[int] = []
    callbacks = FailingCallbacks()
    with pytest.raises(ConnectionError, match="the database went away"):
        launch(make_spec(dropout_free_bert, tmp_path), callbacks, on_start=pids.extend)
    assert len(callbacks.steps) == 13
    assert_no_process_left(pids)


def wait_forever(
    spec: ClassificationSpec, callbacks: Any, *, resume_from: Path | None = None, device: torch.device | None = None
) -> None:
    """Stands for a rank deep in a long step (no collective, no callback): it says so, then never returns."""
    (spec.checkpoint_dir.parent / f"rank{os.environ['RANK']}.running").touch()
    threading.Event().wait()


# A caller process that dies by SIGKILL once both ranks run, as a worker past its hard time limit does.
CALLER_SCRIPT = """
import json, os, signal, sys, time
from pathlib import Path
from tests.training.conftest import Recorder
from tests.training.test_distributed import make_spec, wait_forever
from training.distributed import run_distributed

base, work, pid_file = map(Path, sys.argv[1:4])

def die_once_ranks_run(pids):
    pid_file.write_text(json.dumps(pids))
    deadline = time.monotonic() + 120
    while not all((work / f"rank{rank}.running").exists() for rank in range(2)):
        if time.monotonic() > deadline:
            sys.exit("the ranks never started")
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)

run_distributed(wait_forever, make_spec(base, work), 2, Recorder(), on_start=die_once_ranks_run)
"""


def test_ranks_end_when_their_caller_is_killed(dropout_free_bert: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids.json"
    log_file = tmp_path / "caller.log"
    repo = Path(__file__).resolve().parents[2]
    # Output to a file, not a pipe: ranks that outlive the caller would hold a pipe open, and run() wait on it.
    with log_file.open("wb") as log:
        caller = subprocess.run(
            [sys.executable, "-c", CALLER_SCRIPT, str(dropout_free_bert), str(tmp_path / "run"), str(pid_file)],
            cwd=repo, stdout=log, stderr=subprocess.STDOUT, timeout=240,
        )
    assert caller.returncode == -signal.SIGKILL, log_file.read_text()[-2000:]
    pids = json.loads(pid_file.read_text())
    assert len(pids) == 2
    deadline = time.monotonic() + FAIL_FAST_SECONDS
    try:
        while alive := [pid for pid in pids if not ended(pid)]:
            assert time.monotonic() < deadline, f"ranks {alive} outlived their caller"
            # A bounded wait on the orphans (no longer our children, so psutil polls for them).
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.wait_procs([psutil.Process(pid) for pid in alive], timeout=0.5)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def ended(pid: int) -> bool:
    # An orphan's exit is reaped by whichever process adopted it, so a zombie has ended too.
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# This process's children when the test started: in the whole suite, the session's stack runs as children.
_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before() -> Iterator[None]:
    _BEFORE.clear()
    _BEFORE.update(p.pid for p in psutil.Process().children(recursive=True))
    yield


def assert_no_process_left(pids: list[int]) -> None:
    assert len(pids) == 2
    # Every rank is gone and reaped (a zombie would still be listed), and nothing else the test started was
    # left either but multiprocessing's resource tracker, which every spawn starts once per interpreter and
    # which ends with it.
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in _BEFORE and "resource_tracker" not in " ".join(p.cmdline())]
    assert left == []
    for pid in pids:
        assert not psutil.pid_exists(pid)
