"""A plain training loop with exact stop, checkpoint and resume semantics.

The batches of epoch ``e`` are drawn from a generator seeded with ``seed + e`` (length-grouped when the
caller gives each row's length; see ``training.batching``), so a resumed run rebuilds the same list and
skips straight to the batch it stopped at. A checkpoint holds everything the loop needs
(weights, optimizer, scheduler, RNG states, counters), so a paused-then-resumed run ends with the same
weights as an uninterrupted one.

Data-parallel: in a process group of N ranks (see ``training.distributed``), every rank draws the same
global batches and trains on its share of each (``shard_rows``); the reduced gradient is the one a single
process computes for the whole batch, so the batch size, the learning-rate schedule and the global steps
are a single run's, and a checkpoint resumes at any N. Rank 0 alone evaluates, writes checkpoints (of the
unwrapped model) and fires callbacks; its should_stop answer is broadcast, so every rank stops at the same
step. Alone, a process runs exactly the single-process code.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_model
from transformers import get_linear_schedule_with_warmup, set_seed

from training.batching import epoch_batches, shard_rows
from training.callbacks import StepState, StopReason, TrainingCallbacks
from training.devices import autocast_dtype, pick_device
from training.distributed import DataParallel
from training.fsutil import replace_dir

log = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
_STATE_FILE = "trainer_state.json"
# Written last, so its presence marks a complete checkpoint even without the atomic rename.
_COMPLETE_MARKER = _STATE_FILE
# Labels a loss ignores (transformers' convention): padding and prompt tokens.
_IGNORE_INDEX = -100

Metrics = dict[str, float]
Evaluate = Callable[[torch.nn.Module], Metrics]


class IndexedDataset(Protocol):
    """Anything with a length and integer indexing: a list, a torch Dataset, a datasets.Dataset."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


Collator = Callable[[list[Any]], Mapping[str, Any]]


@dataclass
class TrainArgs:
    """Optimisation settings for one run; `logging_steps=0` logs about 100 history rows per run."""

    n_epochs: int
    batch_size: int
    learning_rate: float
    checkpoint_dir: Path
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    keep_checkpoints: int = 2
    logging_steps: int = 0
    # Writes what, beside the weights, makes a checkpoint a model that serves and trains on (the tokenizer):
    # a checkpoint is a model (`ft:…:ckpt-step-N`). None: weights and training state only.
    checkpoint_extras: Callable[[Path], None] | None = None

    @classmethod
    def from_hyperparameters(
        cls, hp: dict[str, Any], checkpoint_dir: Path, seed: int, batch_size: int | None = None
    ) -> TrainArgs:
        """The run's settings from a task's resolved hyperparameters; ``batch_size`` overrides the resolved one."""
        return cls(
            n_epochs=int(hp["n_epochs"]),
            batch_size=int(hp["batch_size"]) if batch_size is None else batch_size,
            learning_rate=float(hp["learning_rate"]),
            checkpoint_dir=checkpoint_dir,
            warmup_ratio=float(hp["warmup_ratio"]),
            weight_decay=float(hp["weight_decay"]),
            seed=seed,
        )


def tokenizer_writer(tokenizer: Any, max_length: int | None = None) -> Callable[[Path], None]:
    """`checkpoint_extras` that saves ``tokenizer`` (truncating at ``max_length``, where training did)."""

    def write(directory: Path) -> None:
        saved = tokenizer.model_max_length
        if max_length is not None:
            tokenizer.model_max_length = max_length
        try:
            tokenizer.save_pretrained(directory)
        finally:
            tokenizer.model_max_length = saved

    return write


@dataclass
class TrainOutcome:
    """How a run ended; `checkpoint` is the newest checkpoint this run wrote (None if none)."""

    completed: bool
    stop_reason: StopReason | None
    global_step: int
    total_steps: int
    epoch: float
    history: list[dict[str, Any]]
    trained_tokens: int
    checkpoint: Path | None = None


@dataclass
class _LoopState:
    global_step: int = 0
    epoch_index: int = 0
    step_in_epoch: int = 0
    trained_tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # Losses since the last history row, so a resumed run logs the same means.
    interval_loss_sum: float = 0.0
    interval_loss_count: int = 0
    # Sums of the extra training metrics a model returns beside its loss (DPO's rewards), over the same steps.
    interval_metric_sums: dict[str, float] = field(default_factory=dict)
    # Checkpoints written before length grouping existed resume in the shuffled order they started with.
    length_grouped: bool = False


class _StepShare(NamedTuple):
    """What one rank's share of a step contributed, gathered from every rank to make the step's totals."""

    weight: int
    loss_sum: float
    tokens: int
    metric_sums: dict[str, float]
    has_grad: bytes


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint directory named ``name``, or None when it is not one."""
    match = _CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Return the complete checkpoint with the highest step under `checkpoint_dir`, or None."""
    found = _list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def run_training(
    model: torch.nn.Module,
    train_dataset: IndexedDataset,
    collator: Collator,
    args: TrainArgs,
    callbacks: TrainingCallbacks,
    evaluate: Evaluate | None = None,
    resume_from: Path | None = None,
    device: torch.device | None = None,
    lengths: Sequence[int] | None = None,
) -> TrainOutcome:
    """Train `model` with AdamW and a linear warmup schedule; stop, checkpoint and resume exactly.

    With `lengths` (each row's token count) batches hold rows of similar length, so little compute goes to
    padding; the batches stay a function of (seed, epoch), so resuming is still exact. In an initialised
    process group it trains data-parallel (see the module's docstring); `callbacks` then matter on rank 0 only.
    """
    _check_args(args)
    n_rows = len(train_dataset)
    if n_rows == 0:
        raise ValueError("the training set is empty")
    if lengths is not None and len(lengths) != n_rows:
        raise ValueError(f"{len(lengths)} lengths for {n_rows} training rows")
    device = device or pick_device()
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    steps_per_epoch = math.ceil(n_rows / args.batch_size)
    total_steps = steps_per_epoch * args.n_epochs
    logging_steps = args.logging_steps or max(1, total_steps // 100)

    world = DataParallel.current(device)
    lead = world is None or world.rank == 0

    model.to(device)
    optimizer = torch.optim.AdamW(
        _param_groups(model, args.weight_decay),
        lr=args.learning_rate,
        # One kernel over each parameter instead of a dozen elementwise passes: on this CPU the step of
        # MiniLM's 22.7M parameters fell from 340-990 ms (as long as forward and backward together) to
        # 30-90 ms. A checkpoint stores the flag, so runs resumed from older checkpoints keep their kernel.
        fused=True if device.type in ("cpu", "cuda") else None,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    amp_dtype = autocast_dtype(device)
    # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    if lead:
        # One writer: the other ranks only read the checkpoint they resume from.
        args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_dirs(args.checkpoint_dir)

    if resume_from is not None:
        state = _restore(resume_from, model, optimizer, scheduler, scaler, args, n_rows)
        if state.length_grouped and lengths is None:
            raise ValueError(f"cannot resume from {resume_from}: it trained on length-grouped batches, "
                             "and no row lengths were given")
        log.info("resumed from %s at step %d of %d", resume_from, state.global_step, total_steps)
        if world is not None and world.rank > 0:
            _restore_rank_rng(resume_from, world.rank, args.seed)
    else:
        state = _LoopState(length_grouped=lengths is not None)
        # Dropout masks then depend only on the seed, not on what ran before in this process.
        set_seed(args.seed)
        if world is not None and world.rank > 0:
            # Its own stream (as accelerate seeds ranks), or its rows would get rank 0's dropout masks.
            set_seed(args.seed + world.rank)
    if world is not None:
        world.broadcast_model(model)

    def outcome(completed: bool, reason: StopReason | None, checkpoint: Path | None) -> TrainOutcome:
        return TrainOutcome(
            completed=completed,
            stop_reason=reason,
            global_step=state.global_step,
            total_steps=total_steps,
            epoch=state.epoch_index + state.step_in_epoch / steps_per_epoch,
            history=list(state.history),
            trained_tokens=state.trained_tokens,
            checkpoint=checkpoint,
        )

    def checkpoint(metrics: dict[str, Any]) -> Path:
        # Every rank's RNG state goes into the checkpoint, so a resume with as many ranks is exact.
        rank_rng = world.gather_to_lead(_rng_state()) if world is not None else None
        if not lead:
            return args.checkpoint_dir / f"checkpoint-{state.global_step}"
        path = _save_checkpoint(model, optimizer, scheduler, scaler, state, args, n_rows, rank_rng)
        callbacks.on_checkpoint(state.global_step, path, metrics)
        return path

    # A run resumed from its final checkpoint trains no further and reports that checkpoint.
    last_checkpoint: Path | None = resume_from
    model.train()
    started = time.perf_counter()
    samples_this_run = 0
    while state.epoch_index < args.n_epochs:
        batches = epoch_batches(n_rows, args.batch_size, args.seed, state.epoch_index,
                                lengths if state.length_grouped else None)
        while state.step_in_epoch < steps_per_epoch:
            reason = callbacks.should_stop() if lead else None
            if world is not None:
                reason = world.broadcast_stop(reason)
            if reason is not None:
                log.info("stopping at step %d: %s", state.global_step, reason)
                if reason in ("cancel", "lost"):
                    return outcome(False, reason, None)
                return outcome(False, reason, checkpoint({"stop_reason": reason}))
            indices = batches[state.step_in_epoch]
            if world is None:
                batch = collator([train_dataset[i] for i in indices])
                tokens = _count_tokens(batch)
                learning_rate = float(optimizer.param_groups[0]["lr"])
                loss, extra = _train_step(model, batch, optimizer, scheduler, scaler, device, amp_dtype, args)
            else:
                learning_rate = float(optimizer.param_groups[0]["lr"])
                rows = shard_rows([train_dataset[i] for i in indices], world.rank, world.size)
                loss, extra, tokens = _data_parallel_step(
                    model, rows, collator, optimizer, scheduler, scaler, device, amp_dtype, args, world
                )
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss became {loss} at step {state.global_step + 1}; try a lower learning rate"
                )
            state.global_step += 1
            state.step_in_epoch += 1
            state.trained_tokens += tokens
            state.interval_loss_sum += loss
            state.interval_loss_count += 1
            for name, value in extra.items():
                state.interval_metric_sums[name] = state.interval_metric_sums.get(name, 0.0) + value
            samples_this_run += len(indices)
            epoch = state.epoch_index + state.step_in_epoch / steps_per_epoch
            elapsed = max(time.perf_counter() - started, 1e-9)
            if lead:
                callbacks.on_step(
                    StepState(
                        step=state.global_step,
                        total_steps=total_steps,
                        epoch=epoch,
                        train_loss=loss,
                        learning_rate=learning_rate,
                        samples_per_second=samples_this_run / elapsed,
                    )
                )
            # The epoch-end row below covers the last step of an epoch.
            if state.global_step % logging_steps == 0 and state.step_in_epoch < steps_per_epoch:
                row = _history_row(state, epoch, learning_rate)
                state.history.append(row)
                if lead:
                    callbacks.on_log(state.global_step, epoch,
                                     {k: v for k, v in row.items() if k not in ("step", "epoch")})

        row = _history_row(state, float(state.epoch_index + 1), float(optimizer.param_groups[0]["lr"]))
        # Rank 0's history is the run's; the other ranks wait for it at the checkpoint below.
        if evaluate is not None and lead:
            model.eval()
            metrics = evaluate(model)
            model.train()
            row.update({(k if k.startswith("eval_") else f"eval_{k}"): float(v) for k, v in metrics.items()})
        state.history.append(row)
        state.epoch_index += 1
        state.step_in_epoch = 0
        reported = {k: v for k, v in row.items() if k not in ("step", "epoch")}
        if lead:
            callbacks.on_evaluate(state.global_step, float(state.epoch_index), reported)
        last_checkpoint = checkpoint(reported)
    return outcome(True, None, last_checkpoint)


def _check_args(args: TrainArgs) -> None:
    if args.n_epochs < 1:
        raise ValueError("n_epochs must be at least 1")
    if args.batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not args.learning_rate > 0:
        raise ValueError("learning_rate must be positive")
    if not 0.0 <= args.warmup_ratio < 1.0:
        raise ValueError("warmup_ratio must be in [0, 1)")
    if args.weight_decay < 0:
        raise ValueError("weight_decay must not be negative")
    if args.keep_checkpoints < 1:
        raise ValueError("keep_checkpoints must be at least 1")
    if args.logging_steps < 0:
        raise ValueError("logging_steps must not be negative")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Biases and norm weights (1-d) are not decayed: decaying them only hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _count_tokens(batch: Mapping[str, Any]) -> int:
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum().item())
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def _train_step(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    args: TrainArgs,
) -> tuple[float, Metrics]:
    """One optimizer step; returns the loss and any `metrics` the model's output carries beside it."""
    loss, extra = _forward_backward(model, batch, scaler, device, amp_dtype)
    _optimizer_step(model, optimizer, scheduler, scaler, args)
    return float(loss.float().item()), extra


def _data_parallel_step(
    model: torch.nn.Module,
    rows: list[Any],
    collator: Collator,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    args: TrainArgs,
    world: DataParallel,
) -> tuple[float, Metrics, int]:
    """One optimizer step over this rank's `rows` of the global batch; returns the global batch's loss,
    metrics and token count, the same on every rank."""
    weight, loss_sum, tokens, metric_sums = 0, 0.0, 0, {}
    if rows:
        batch = collator(rows)
        tokens = _count_tokens(batch)
        weight = _loss_weight(batch, len(rows))
        # A share with nothing to learn (no labelled token) adds nothing, where its NaN mean would poison all.
        if weight > 0:
            loss, extra = _forward_backward(model, batch, scaler, device, amp_dtype)
            loss_sum = float(loss.float().item()) * weight
            metric_sums = {k: v * weight for k, v in extra.items()}
    if weight == 0 and scaler is not None:
        # A loss scaler sets its scale on first use; unscale_ below needs it on a rank that has not scaled yet.
        scaler.scale(torch.zeros((), device=device))
    params = [p for p in model.parameters() if p.requires_grad]
    shares: list[_StepShare] = world.all_gather(
        _StepShare(weight, loss_sum, tokens, metric_sums, bytes(p.grad is not None for p in params))
    )
    total_weight = sum(share.weight for share in shares)
    total_tokens = sum(share.tokens for share in shares)
    if total_weight == 0:
        # As a single process's mean over no targets: NaN, which the loop turns into an error on every rank.
        optimizer.zero_grad(set_to_none=True)
        return float("nan"), {}, total_tokens
    present = [any(share.has_grad[i] for share in shares) for i in range(len(params))]
    world.reduce_gradients(params, present, weight, total_weight)
    _optimizer_step(model, optimizer, scheduler, scaler, args)
    names = sorted({name for share in shares for name in share.metric_sums})
    metrics = {name: sum(share.metric_sums.get(name, 0.0) for share in shares) / total_weight for name in names}
    return sum(share.loss_sum for share in shares) / total_weight, metrics, total_tokens


def _loss_weight(batch: Mapping[str, Any], n_rows: int) -> int:
    """How many targets the model's mean loss over `batch` averages: its labelled tokens when labels are
    per token (NER, generation), else its rows (a class label per row, DPO's pairs).

    Weighting each rank's gradient by this makes the reduced gradient the whole batch's. A causal LM shifts
    its labels by one, so there it is off by the first position's label: none for prompt/completion and
    chat rows (a prompt token), one token per plain-text row.
    """
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.ndim >= 2 and not labels.is_floating_point():
        return int((labels != _IGNORE_INDEX).sum().item())
    return n_rows


def _forward_backward(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, Metrics]:
    """The forward and backward pass of one batch; returns the (detached) loss and the model's metrics."""
    inputs = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(**inputs)
    loss = outputs["loss"] if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    extra = outputs.get("metrics") if isinstance(outputs, Mapping) else None
    if loss is None:
        raise ValueError("the model returned no loss; the batch must carry labels")
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    return loss.detach(), {k: float(v) for k, v in (extra or {}).items()}


def _optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    args: TrainArgs,
) -> None:
    """Clip, step and advance the schedule on the gradients in place (a data-parallel step's reduced ones)."""
    if scaler is not None:
        # After the reduction, so an inf on any rank is seen, and the step skipped, on every rank.
        scaler.unscale_(optimizer)
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _history_row(state: _LoopState, epoch: float, learning_rate: float) -> dict[str, Any]:
    row: dict[str, Any] = {"step": state.global_step, "epoch": round(epoch, 6), "learning_rate": learning_rate}
    if state.interval_loss_count:
        row["train_loss"] = state.interval_loss_sum / state.interval_loss_count
        row.update({k: v / state.interval_loss_count for k, v in state.interval_metric_sums.items()})
    state.interval_loss_sum = 0.0
    state.interval_metric_sums = {}
    state.interval_loss_count = 0
    return row


# --- checkpoints -------------------------------------------------------------------------------


def _list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoint_dir.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for entry in checkpoint_dir.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir() and (entry / _COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _remove_stale_temp_dirs(checkpoint_dir: Path) -> None:
    # Left by a process that died mid-save; one run owns a checkpoint directory at a time.
    for entry in checkpoint_dir.iterdir():
        if entry.name.startswith((_TMP_PREFIX, ".old-checkpoint-")) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    state: _LoopState,
    args: TrainArgs,
    n_rows: int,
    rank_rng: Sequence[dict[str, Any]] | None = None,
) -> Path:
    final = args.checkpoint_dir / f"checkpoint-{state.global_step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{state.global_step}-", dir=args.checkpoint_dir))
    try:
        _save_model(model, tmp)
        if args.checkpoint_extras is not None:
            args.checkpoint_extras(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        # Rank 0's state is rng.pt above, where a single process keeps its own.
        for rank, rng in list(enumerate(rank_rng or []))[1:]:
            torch.save(rng, tmp / _rank_rng_file(rank))
        trainer_state = {
            "global_step": state.global_step,
            "epoch": state.epoch_index + state.step_in_epoch / math.ceil(n_rows / args.batch_size),
            "epoch_index": state.epoch_index,
            "step_in_epoch": state.step_in_epoch,
            "trained_tokens": state.trained_tokens,
            "history": state.history,
            "interval_loss_sum": state.interval_loss_sum,
            "interval_loss_count": state.interval_loss_count,
            "interval_metric_sums": state.interval_metric_sums,
            "batch_order": "length_grouped" if state.length_grouped else "shuffled",
            "n_rows": n_rows,
            "batch_size": args.batch_size,
            "n_epochs": args.n_epochs,
            "seed": args.seed,
        }
        if rank_rng is not None:
            # Informational: a checkpoint resumes at any process count.
            trainer_state["processes"] = len(rank_rng)
        (tmp / _STATE_FILE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _list_checkpoints(args.checkpoint_dir)[: -args.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def _save_model(model: torch.nn.Module, directory: Path) -> None:
    save_pretrained = getattr(model, "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(directory)
    else:
        save_model(model, str(directory / "model.safetensors"))


def _load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    device = next(model.parameters()).device
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(str(directory / name), device=str(device)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {directory} has weights the model lacks: {unexpected[:5]}")
    # save_pretrained leaves out tied weights; they share storage with a loaded tensor.
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in weights if k in current}
    untied = [k for k in missing if current[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"checkpoint {directory} lacks weights: {untied[:5]}")


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        # Stored as plain types and tensors so the file loads with torch.load(weights_only=True).
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(saved: dict[str, Any]) -> None:
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = saved["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(saved["torch"])
    cuda_states = saved.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _rank_rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _restore_rank_rng(path: Path, rank: int, seed: int) -> None:
    """A rank above 0 continues its own stream when the checkpoint holds it (written by as many ranks or
    more), else starts a stream of its own; rank 0's, the single-process one, `_restore` already set."""
    saved = path / _rank_rng_file(rank)
    if saved.is_file():
        _set_rng_state(torch.load(saved, map_location="cpu", weights_only=True))
    else:
        set_seed(seed + rank)


def _restore(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    args: TrainArgs,
    n_rows: int,
) -> _LoopState:
    state_file = path / _STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {_STATE_FILE})")
    saved = json.loads(state_file.read_text(encoding="utf-8"))
    expected = {"n_rows": n_rows, "batch_size": args.batch_size, "n_epochs": args.n_epochs, "seed": args.seed}
    changed = [f"{k} was {saved.get(k)}, now {v}" for k, v in expected.items() if saved.get(k) != v]
    if changed:
        raise ValueError(f"cannot resume from {path}: " + ", ".join(changed))
    _load_model_weights(model, path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
    return _LoopState(
        global_step=int(saved["global_step"]),
        epoch_index=int(saved["epoch_index"]),
        step_in_epoch=int(saved["step_in_epoch"]),
        trained_tokens=int(saved["trained_tokens"]),
        history=list(saved["history"]),
        interval_loss_sum=float(saved["interval_loss_sum"]),
        interval_loss_count=int(saved["interval_loss_count"]),
        interval_metric_sums={k: float(v) for k, v in saved.get("interval_metric_sums", {}).items()},
        length_grouped=saved.get("batch_order", "shuffled") == "length_grouped",
    )
