"""Data-parallel training on one node: a launcher for N ranks, and the collectives the training loop uses.

`run_distributed` starts N processes the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), initialises a process group in each (gloo on CPU, NCCL with one GPU per rank) and calls the
same training function (`train_classification`, `train_ner`, `train_generation`, `train_dpo`) in every rank.
`run_training` sees the group and trains data-parallel: each rank takes its share of every global batch,
which stays the (seed, epoch) function a single process draws, so a checkpoint resumes at any process count.

Why the caller does not run rank 0 itself: it stays out of every collective, so it can always see a rank
die and end the others, and the callbacks (database writes, events, uploads) keep running in the caller's
process, where a worker built them; rank 0 relays each call to it and waits for the answer, so callbacks
run in the order and at the step boundaries a single process would run them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from training.callbacks import NullCallbacks, StepState, StopReason, TrainingCallbacks
from training.devices import configure_cpu

log = logging.getLogger(__name__)

# torch's own default for gloo. Only a rank that is alive but stuck waits this long: a rank that dies ends
# the group at once (the launcher watches every rank). It has to outlast what rank 0 does alone while the
# others wait at the next collective: an evaluation, a checkpoint, the caller's upload of one.
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# Gradients are reduced in flat buffers of at most this many elements (64 MiB of fp32): one collective per
# bucket instead of one per tensor, without a second copy of every gradient at once.
_BUCKET_ELEMENTS = 16 * 1024 * 1024
_STOP_REASONS: tuple[StopReason | None, ...] = (None, "cancel", "pause", "shutdown", "time_limit", "lost")
_LOOPBACK = "127.0.0.1"


class TrainFunction(Protocol):
    """A task's training entry point, as `train_classification` and its siblings are."""

    def __call__(
        self, spec: Any, callbacks: TrainingCallbacks, *,
        resume_from: Path | None = ..., device: torch.device | None = ...,
    ) -> Any: ...


class RankFailed(RuntimeError):
    """A training rank exited with a non-zero code; the other ranks were ended with it."""

    def __init__(self, rank: int, world_size: int, exitcode: int, detail: str = "", remote_traceback: str = "") -> None:
        self.rank = rank
        self.world_size = world_size
        self.exitcode = exitcode
        self.remote_traceback = remote_traceback
        message = f"training rank {rank} of {world_size} {_describe_exit(exitcode)}"
        super().__init__(f"{message}: {detail}" if detail else message)


def available_processes() -> int:
    """How many ranks this machine can run: one per GPU, or 1 on CPU (a worker's default capacity).

    `torch.cuda.device_count` asks NVML first, which creates no CUDA context, so a worker's main process
    may call this.
    """
    return torch.cuda.device_count() or 1


def run_distributed(
    train: TrainFunction,
    spec: Any,
    processes: int,
    callbacks: TrainingCallbacks,
    *,
    resume_from: Path | None = None,
    backend: str | None = None,
    collective_timeout: timedelta = DEFAULT_COLLECTIVE_TIMEOUT,
    on_start: Callable[[list[int]], None] | None = None,
) -> Any:
    """Run ``train(spec, callbacks, resume_from=...)`` as `processes` data-parallel ranks; return rank 0's result.

    With one process, `train` runs here, exactly as a caller without this function runs it. Otherwise every
    rank runs `train`; only rank 0's callbacks reach `callbacks` (relayed here, in order, synchronously),
    and ranks above 0 write their copy of the finished model into a scratch directory removed afterwards,
    because `train` saves to ``spec.output_dir`` (a dataclass field) on every rank that completes.
    `backend` defaults to NCCL with one GPU per rank when CUDA is present, else gloo on CPU. `on_start`
    gets the ranks' process ids once all have started. If a rank exits with a non-zero code, the others are
    killed at once; the rank's own exception is raised here when it could be sent back (with a note naming
    the rank), chained from a `RankFailed` naming the rank and its exit code, else the `RankFailed` itself.
    An exception raised by `callbacks` ends every rank and propagates as it would from a single process.
    """
    if processes < 1:
        raise ValueError("processes must be at least 1")
    if processes == 1:
        return train(spec, callbacks, resume_from=resume_from)
    if not (dataclasses.is_dataclass(spec) and not isinstance(spec, type) and hasattr(spec, "output_dir")):
        raise TypeError("a distributed run needs a dataclass spec with an output_dir")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and torch.cuda.device_count() < processes:
        raise ValueError(f"{processes} processes need {processes} GPUs (one each); this machine has "
                         f"{torch.cuda.device_count()}")
    output_dir = Path(spec.output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch: dict[int, Path] = {}
    ranks: list[_Rank] = []
    store: dist.TCPStore | None = None
    try:
        for rank in range(1, processes):
            # Beside the real output, on the same filesystem; made and removed here, so a killed rank leaves none.
            scratch[rank] = Path(tempfile.mkdtemp(prefix=f".rank{rank}-", dir=output_dir.parent))
        # The caller hosts the rendezvous store on a port the kernel picks and that stays bound, so no other
        # process can take it between choosing and binding (the race of probing for a free port), and the
        # store outlives any rank.
        store = dist.TCPStore(_LOOPBACK, 0, None, True, timeout=collective_timeout, wait_for_workers=False)
        launch = _Launch(
            train=train,
            spec=spec,
            resume_from=resume_from,
            world_size=processes,
            backend=backend,
            port=store.port,
            timeout=collective_timeout,
            # Each rank uses the thread count the caller configured (a worker sets it from its settings).
            threads=torch.get_num_threads(),
            log_level=logging.getLogger().getEffectiveLevel(),
            scratch=scratch,
        )
        context = torch_mp.get_context("spawn")
        with _children_allowed():
            for started in _start_ranks(context, launch, processes):
                ranks.append(started)  # one at a time: the cleanup below must see every rank that started
        if on_start is not None:
            on_start([r.process.pid or 0 for r in ranks])
        return _supervise(ranks, callbacks)
    finally:
        for r in ranks:
            if r.process.is_alive():
                r.process.kill()
        for r in ranks:
            r.process.join()
            r.conn.close()
            r.process.close()
        for directory in scratch.values():
            shutil.rmtree(directory, ignore_errors=True)
        # Releases the port now rather than at garbage collection.
        del store


def _start_ranks(context: Any, launch: _Launch, processes: int) -> Iterator[_Rank]:
    for rank in range(processes):
        ours, theirs = context.Pipe(duplex=True)
        # spawn, not fork: a forked child would inherit the caller's threads, locks and CUDA state.
        process = context.Process(target=_rank_main, args=(launch, rank, theirs), name=f"llmos-train-rank{rank}")
        process.start()
        # Our copy of the child's end closed, its death reads as end-of-file on ours.
        theirs.close()
        yield _Rank(rank, process, ours)


@contextlib.contextmanager
def _children_allowed() -> Iterator[None]:
    """Start ranks from a process of a Celery prefork pool, which `billiard` made the current process.

    It is marked daemonic, and multiprocessing refuses children there so that none outlives its parent; ranks
    cannot: each ends when its parent's process does (`_die_with_parent`), and `run_distributed` kills them on
    every way out. And its authentication key is billiard's type, which refuses to be pickled for a child that
    multiprocessing (not billiard) spawns. So while the ranks start, the flag is lifted and the same key is
    held as multiprocessing's own type; both are put back after.
    """
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    saved = dict(config)
    config.pop("daemon", None)
    if "authkey" in config:
        key_type = multiprocessing.process.AuthenticationString  # type: ignore[attr-defined]
        config["authkey"] = key_type(bytes(config["authkey"]))
    try:
        yield
    finally:
        config.clear()
        config.update(saved)


# --- the launcher's side ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Launch:
    train: TrainFunction
    spec: Any
    resume_from: Path | None
    world_size: int
    backend: str
    port: int
    timeout: timedelta
    threads: int
    log_level: int
    scratch: Mapping[int, Path]


@dataclasses.dataclass
class _Rank:
    rank: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    error: tuple[BaseException | None, str, bool] | None = None
    open: bool = True


_NO_RESULT = object()


def _supervise(ranks: list[_Rank], callbacks: TrainingCallbacks) -> Any:
    """Serve rank 0's callbacks and wait for every rank; raise as soon as one exits with a non-zero code."""
    result: Any = _NO_RESULT
    running = {r.process.sentinel: r for r in ranks}
    world_size = len(ranks)
    while running:
        conns = {r.conn: r for r in ranks if r.open}
        # Waiting on the exit sentinels too: a killed rank is seen at once, with no polling interval.
        ready = wait([*conns, *running])
        for conn in [obj for obj in ready if obj in conns]:
            result = _receive(conns[conn], callbacks, result)
        failed = []
        for sentinel in [obj for obj in ready if obj in running]:
            r = running.pop(sentinel)
            r.process.join()
            if r.process.exitcode != 0:
                failed.append(r)
        if failed:
            for r in ranks:
                if r.process.is_alive():
                    r.process.kill()
            for r in failed:
                # The rank wrote its error before exiting, so what it sent is already in the pipe.
                while r.open and r.conn.poll():
                    result = _receive(r, callbacks, result, serve=False)
            raise _failure(min(failed, key=_blame), world_size)
    if result is _NO_RESULT:
        raise RankFailed(0, world_size, 0, "it ended without sending a result")
    return result


def _receive(r: _Rank, callbacks: TrainingCallbacks, result: Any, serve: bool = True) -> Any:
    try:
        message = r.conn.recv()
    except EOFError:
        r.open = False
        return result
    kind = message[0]
    if kind == "call" and serve:
        name, args = message[1], message[2]
        # An exception here ends the run: run_distributed's cleanup kills every rank, as a single process's
        # callback exception would end its loop.
        r.conn.send(("ok", getattr(callbacks, name)(*args)))
    elif kind == "result":
        return message[1]
    elif kind == "error":
        r.error = (message[1], message[2], message[3])
    return result


def _blame(r: _Rank) -> tuple[int, int]:
    # The root cause first: an exception of the rank's own, then a rank killed by a signal, and last a rank
    # whose collective failed, which is what the others see when a peer dies.
    exitcode = r.process.exitcode or 0
    if r.error is not None and not r.error[2]:
        return (0, r.rank)
    return (1 if exitcode < 0 else 2, r.rank)


def _failure(r: _Rank, world_size: int) -> BaseException:
    exitcode = r.process.exitcode or 0
    exc, remote_traceback, _ = r.error or (None, "", False)
    last_line = remote_traceback.strip().splitlines()[-1] if remote_traceback.strip() else ""
    failure = RankFailed(r.rank, world_size, exitcode, last_line, remote_traceback)
    if exc is None:
        return failure
    exc.add_note(f"raised on training rank {r.rank} of {world_size} ({_describe_exit(exitcode)})")
    exc.__cause__ = failure
    return exc


def _describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


# --- a rank's side ---------------------------------------------------------------------------------


def _rank_main(launch: _Launch, rank: int, conn: Connection) -> None:
    """The body of one rank's process: join the group, train, send rank 0's result back."""
    # A stop is the caller's decision, relayed by should_stop, and ending the group is its job too: a Ctrl-C
    # or SIGTERM sent to the whole process group must not kill a rank behind its back mid-step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    logging.basicConfig(level=launch.log_level,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    # What torchrun sets, for any library that reads it.
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(launch.world_size),
        "LOCAL_WORLD_SIZE": str(launch.world_size), "MASTER_ADDR": _LOOPBACK, "MASTER_PORT": str(launch.port),
    })
    configure_cpu(launch.threads)
    try:
        device = torch.device("cpu")
        if launch.backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        store = dist.TCPStore(_LOOPBACK, launch.port, None, False, timeout=launch.timeout)
        dist.init_process_group(launch.backend, store=store, rank=rank, world_size=launch.world_size,
                                timeout=launch.timeout)
        callbacks: TrainingCallbacks = _RelayedCallbacks(conn) if rank == 0 else NullCallbacks()
        spec = launch.spec
        if rank > 0:
            spec = dataclasses.replace(spec, output_dir=launch.scratch[rank] / "model")
        result = launch.train(spec, callbacks, resume_from=launch.resume_from, device=device)
        # Only on success: tearing down a group whose peer died can block in NCCL.
        dist.destroy_process_group()
        if rank == 0:
            conn.send(("result", result))
    except BaseException as exc:  # every failure is reported to the caller, then the rank exits
        _report(conn, exc)
        logging.shutdown()
        # Straight out: interpreter teardown could wait on gloo's or NCCL's threads stuck on a dead peer.
        os._exit(1)


def _die_with_parent() -> None:
    """End this rank when the caller's process dies (a worker's hard time limit SIGKILLs it), so no rank
    outlives it holding a GPU or waiting in a collective."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="llmos-parent-watch", daemon=True).start()


def _report(conn: Connection, exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    collective = isinstance(exc, dist.DistError)
    sendable: BaseException | None = exc
    try:
        # Sent only when it survives the trip, so the caller re-raises the same error a single process would.
        pickle.loads(pickle.dumps(exc))
    except Exception:  # any pickling failure: the text goes alone
        sendable = None
    try:
        conn.send(("error", sendable, text, collective))
    except Exception:  # the caller is gone or the pipe broke: the exit code still tells
        log.exception("could not report a failure to the launcher")


class _RelayedCallbacks:
    """Rank 0's callbacks: each call goes to the caller's process and returns its answer."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def _call(self, name: str, *args: Any) -> Any:
        self._conn.send(("call", name, args))
        reply = self._conn.recv()
        return reply[1]

    def on_step(self, state: StepState) -> None:
        """Relay a step."""
        self._call("on_step", state)

    def on_log(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        """Relay a loss-curve point."""
        self._call("on_log", step, epoch, metrics)

    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        """Relay an evaluation."""
        self._call("on_evaluate", step, epoch, metrics)

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """Relay a finished checkpoint; returns once the caller has handled it (it may upload it)."""
        self._call("on_checkpoint", step, path, metrics)

    def should_stop(self) -> StopReason | None:
        """Ask the caller."""
        reason: StopReason | None = self._call("should_stop")
        return reason


# --- the collectives of a data-parallel step -------------------------------------------------------


class DataParallel:
    """This process's place in an initialised process group, and the collectives `run_training` needs.

    Gradients are averaged by an all-reduce after the backward pass rather than by wrapping the model in
    DistributedDataParallel, because: a step's shares differ in size (the last batch of an epoch, a batch
    smaller than the world, token-level losses), so each rank's gradient is weighted by how many targets
    its loss averaged, which makes the reduced gradient the one a single process computes for the whole
    batch, where DDP's fixed 1/N mean cannot; a rank with an empty share still takes part (DDP needs a
    forward on every rank); and the model stays unwrapped, so checkpoints, `save_pretrained`, LoRA and
    DPO's wrapper see the same module as in a single process. What it gives up is DDP's overlap of the
    reduction with the backward pass, a few percent of a step for the models trained here.
    """

    def __init__(self, rank: int, size: int, device: torch.device) -> None:
        self.rank = rank
        self.size = size
        # NCCL moves only CUDA tensors; gloo works on CPU ones.
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    @classmethod
    def current(cls, device: torch.device) -> DataParallel | None:
        """The group this process belongs to, or None when it trains alone."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def broadcast_stop(self, reason: StopReason | None) -> StopReason | None:
        """Rank 0's answer to should_stop, on every rank, so all stop before the same step."""
        code = torch.tensor([_STOP_REASONS.index(reason)], dtype=torch.long, device=self.device)
        dist.broadcast(code, src=0)
        return _STOP_REASONS[int(code.item())]

    def broadcast_model(self, model: torch.nn.Module) -> None:
        """Make every rank's weights and buffers rank 0's, as DDP does at construction."""
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order (small picklable values: a step's loss and counts)."""
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def gather_to_lead(self, value: Any) -> list[Any] | None:
        """Every rank's `value` on rank 0, in rank order; None on the other ranks."""
        gathered: list[Any] | None = [None] * self.size if self.rank == 0 else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def reduce_gradients(
        self, params: Sequence[torch.nn.Parameter], present: Sequence[bool], weight: float, total_weight: float
    ) -> None:
        """Replace each gradient by ``sum over ranks(weight * gradient) / total_weight``.

        A parameter with no gradient on any rank keeps none, as in a single process (AdamW then skips it);
        one with a gradient somewhere counts as zero where it has none.
        """
        grads: list[torch.Tensor] = []
        for param, any_rank in zip(params, present, strict=True):
            if not any_rank:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        for bucket in _buckets(grads):
            flat = torch.cat([grad.reshape(-1) for grad in bucket]).mul_(weight)
            dist.all_reduce(flat)
            flat.div_(total_weight)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()


def _buckets(grads: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for grad in grads:
        same_kind = buckets and buckets[-1][0].dtype == grad.dtype and buckets[-1][0].device == grad.device
        if not same_kind or size + grad.numel() > _BUCKET_ELEMENTS:
            buckets.append([])
            size = 0
        buckets[-1].append(grad)
        size += grad.numel()
    return buckets
