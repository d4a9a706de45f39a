"""Where models run for inference: warm in a cache, fed by dynamic batchers, in the worker or beside it.

A `LocalRunner` holds the models (`ModelCache`) and the batchers (`BatcherRegistry`) in the calling process.
The inference-only worker puts them in a child process of their own instead (`EngineProcess`), because a
forward pass shares its process's GIL: the worker's consumer, row claims and replies, Python run for every
request, took it from the model between tensor operations, and a batch ran a third slower than the same
model alone. The child runs only the models; the worker sends it each request's `ModelCall` over a pipe
and gets the results back, a small pickle each way.

Everything here is free of Celery, so the child imports none of it.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.util
import pickle
import signal
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from core.settings import Settings, get_settings
from domain import batching
from domain.batching import BatcherRegistry
from domain.serving import EMBEDDINGS, GENERATION, ZERO_SHOT
from infra import replies
from tasks import recipes

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class ModelCall:
    """One request's work for one model: inputs through a predictor method, batched with others or alone."""

    model_id: str
    path: str
    task: str  # classification | ner | generation | embeddings: which predictor the model loads as
    method: str  # predict | generate | chat | embed | zero_shot
    inputs: list[Any]
    # Sampling parameters of generate/chat, sorted (each request keeps its own in the model's decode batch).
    params: tuple[tuple[str, Any], ...] = ()
    # Rows the request adds to a forward pass (generation: prompts times n); None: one per input.
    size: int | None = None
    # False for a batch file's lines: one call of their own, beside the online batches, not queued among them.
    batched: bool = True
    # Whose request this is: batches take requests from each tenant in turn (`domain.batching`).
    lane: str | None = None
    # Online generation with `stream: true`: the reply-channel key its text goes to as it grows.
    stream: str | None = None


class Runner(Protocol):
    def submit(self, call: ModelCall) -> Future[list[Any]]: ...

    def run(self, call: ModelCall) -> list[Any]: ...


def model_bytes(predictor: Any) -> int:
    """Memory of a predictor's model: its parameters and buffers (tied weights counted once), and the packed
    weights of int8 layers, which are neither."""
    model = predictor.model
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and callable(getattr(module, "weight", None)):
            weight = module.weight()
            size += weight.numel() * weight.element_size()
    return size


def quantize_int8(predictor: Any) -> Any:
    """The predictor with its model's Linear layers in dynamic int8, when it runs on the CPU.

    Weights are stored as int8, one scale per output channel, and activations quantised per batch on the fly
    (`quantize_dynamic`): on CPU the Linear layers are most of an encoder's or a small decoder's time, and
    int8 matrix products run them faster. Per-channel scales: per-tensor ones moved MiniLM's outputs twice as
    far for no speed. On CUDA int8 would run slower than half precision, so a predictor there is left as it
    is. GPT-2's attention and MLP are `Conv1D`, not Linear: only its output layer is quantised.
    """
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if predictor.device.type != "cpu":
        return predictor
    predictor.model = quantize_dynamic(predictor.model, {torch.nn.Linear: per_channel_dynamic_qconfig},
                                       dtype=torch.qint8)
    return predictor


def load_predictor(task: str, path: Path, int8: bool = False) -> Any:
    """A fine-tuning task's predictor (`recipes`), or the encoder's embeddings predictor.

    With ``int8`` (`LLMOS_CPU_INT8`) a classification, NER or generation predictor on the CPU runs quantised.
    Embeddings (and zero-shot labels, scored with them) stay float32: int8 MiniLM vectors were 0.97 cosine
    from float on average (0.91 at worst) on SST-2 sentences, where the contract promises sentence-
    transformers' vectors to 1e-4, and zero-shot margins are a few hundredths of cosine, so labels flipped.
    """
    if task == "embeddings":
        from tasks.encoders import EmbeddingPredictor

        return EmbeddingPredictor(path)
    predictor = recipes.predictor(task, path)
    return quantize_int8(predictor) if int8 else predictor


class ModelCache:
    """Predictors by (task, model ID) within a memory budget, least recently used evicted first.

    Each model loads once per process, however many threads ask for it at once: a lock per key serialises
    its load while other models load or serve meanwhile. A model bigger than the whole budget still
    loads, alone. Predictors are thread-safe, so every caller gets the shared instance.
    """

    def __init__(self, budget_bytes: int, load: Callable[[str, Path], Any] = load_predictor) -> None:
        self.budget_bytes = budget_bytes
        self._load = load
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        # One lock per key ever loaded: tiny, and never dropping them means no two loads of one key race.
        self._key_locks: dict[str, threading.Lock] = {}
        self.loads = 0

    def get(self, model_id: str, task: str, path: Path) -> Any:
        """The warm predictor for `model_id`'s `task`, loaded from `path` on first use."""
        key = f"{task}:{model_id}"
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                hit = self._hit(key)
                if hit is not None:
                    return hit
            started = time.perf_counter()
            predictor = self._load(task, path)
            size = model_bytes(predictor)
            with self._lock:
                self.loads += 1
                self._items[key] = (predictor, size)
                self._evict(keep=key)
            log.info("loaded %s (%.1f MiB) in %.2fs", key, size / MIB, time.perf_counter() - started)
            return predictor

    def _hit(self, key: str) -> Any:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def _evict(self, keep: str) -> None:
        """Drop least recently used models until the warm ones fit the budget (call with the lock held)."""
        if self._items[keep][1] > self.budget_bytes:
            log.warning("%s needs %.1f MiB, more than the model cache's whole budget of %.1f MiB; kept alone",
                        keep, self._items[keep][1] / MIB, self.budget_bytes / MIB)
        while self.used_bytes() > self.budget_bytes and len(self._items) > 1:
            evicted = next(k for k in self._items if k != keep)
            _, size = self._items.pop(evicted)
            # Requests still running on it keep their reference; its memory goes when they finish.
            log.info("evicted %s (%.1f MiB) from the model cache", evicted, size / MIB)

    def used_bytes(self) -> int:
        """Memory of the models warm now."""
        return sum(size for _, size in self._items.values())

    def keys(self) -> list[str]:
        """Warm models' keys, least recently used first."""
        with self._lock:
            return list(self._items)


class BatchSizeRecorder:
    """Counts this process's forward-pass sizes and adds them to the shared Redis histogram once a second.

    A batch only bumps a local counter: a Redis round trip per batch would sit on every request's path, and a
    stalled Redis must not stall inference. Counts not yet flushed when the process exits are lost.
    """

    def __init__(self, flush_seconds: float = 1.0) -> None:
        self.flush_seconds = flush_seconds
        self._counts: Counter[str] = Counter()
        self._rows = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, size: int) -> None:
        with self._lock:
            self._counts[batching.size_bucket(size)] += 1
            self._rows += size
            if self._thread is None:  # started here, not at init: a prefork pool process must own it
                self._thread = threading.Thread(target=self._flush_forever, name="batch sizes", daemon=True)
                self._thread.start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self.flush_seconds)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            counts, rows = self._counts, self._rows
            self._counts, self._rows = Counter(), 0
        conn = replies.client()
        if not counts or conn is None:
            return  # a non-Redis broker has nowhere shared to keep them
        try:
            pipe = conn.pipeline(transaction=True)  # buckets and sum move together for a scrape
            for bucket, count in counts.items():
                pipe.hincrby(batching.BATCH_SIZES_KEY, bucket, count)
            pipe.hincrby(batching.BATCH_SIZES_KEY, "sum", rows)
            pipe.execute()
        except Exception:
            log.warning("batch size counts not recorded; kept for the next flush", exc_info=True)
            with self._lock:
                self._counts.update(counts)
                self._rows += rows


class LocalRunner:
    """Models warm in this process, concurrent calls for one model and method sharing forward passes."""

    def __init__(self, settings: Settings) -> None:
        self.torch_threads = settings.torch_threads
        self.cache = ModelCache(settings.model_cache_mb * MIB, partial(load_predictor, int8=settings.cpu_int8))
        self.batchers = BatcherRegistry(settings.inference_batch_window_ms / 1000, settings.inference_max_batch_size)
        self.batch_sizes = BatchSizeRecorder()
        from training.decoding import DecodeLoops  # torch: paid by the model process, not the worker

        # Online generation: one continuously batched decode loop per model.
        self.decoders = DecodeLoops(settings.inference_max_batch_size, publish=_publish_chunks,
                                    record=self.batch_sizes.add, prepare=partial(_configure_cpu, self.torch_threads))
        # Where generation requests are tokenised and checked, and their model loaded, before they join a
        # decode loop: not on the thread that hands in calls, which must not stall behind a model load.
        self._admissions = ThreadPoolExecutor(max_workers=2, thread_name_prefix="admit")
        # Unbatched calls (batch files' lines) when they come through `submit`, whose caller must not block.
        self._alone = ThreadPoolExecutor(max_workers=4, thread_name_prefix="unbatched")

    def _predictor(self, call: ModelCall) -> Any:
        from training.devices import configure_cpu
        from training.predict import is_causal_lm

        # Thread count and denormal flushing are per thread, and calls run on whichever thread takes them.
        configure_cpu(self.torch_threads)
        task = call.task
        if task == ZERO_SHOT:
            # Labels are scored by an encoder's embeddings or by a generation model's answer likelihood: the
            # predictor the model already has warm for its own task (one copy of its weights).
            task = GENERATION if is_causal_lm(Path(call.path)) else EMBEDDINGS
        return self.cache.get(call.model_id, task, Path(call.path))

    def submit(self, call: ModelCall) -> Future[list[Any]]:
        """The future results of `call`, one per input in order."""
        if not call.batched:
            return self._alone.submit(self.run_alone, call)
        if call.method in GENERATION_METHODS:
            return self._generate(call)
        max_size = self.batchers.max_size

        def forward(inputs: list[Any], _group: Hashable) -> list[Any]:
            # The batcher's thread runs this for every batch of the key: model, task and method.
            results: list[Any] = getattr(self._predictor(call), call.method)(inputs, batch_size=max_size)
            self.batch_sizes.add(len(inputs))
            return results

        return self.batchers.submit((call.task, call.method, call.model_id), forward, call.inputs,
                                    size=call.size, lane=call.lane)

    def _generate(self, call: ModelCall) -> Future[list[Any]]:
        """The future choices of a generation call, from the model's decode loop."""
        outer: Future[list[Any]] = Future()

        def admit() -> None:
            from training.decoding import GenerationRequest

            try:
                predictor = self._predictor(call)
                params = dict(call.params)
                with predictor.lock:  # the tokenizer is shared with the decode loop's thread
                    encoded = (predictor.encode_prompts(call.inputs) if call.method == "generate"
                               else predictor.encode_chats(call.inputs))
                request = GenerationRequest(
                    encoded, int(params.get("max_tokens") or 16), float(params.get("temperature", 1.0)),
                    float(params.get("top_p") or 1.0), [s for s in params.get("stop") or () if s],
                    params.get("seed"), int(params.get("n") or 1), lane=call.lane, stream=call.stream)
                predictor.check_request(encoded, request.max_tokens, request.temperature, request.top_p, request.n)
                inner = self.decoders.submit(call.model_id, predictor, request)
            except Exception as exc:
                outer.set_exception(exc)
                return
            inner.add_done_callback(partial(_settle, outer))

        self._admissions.submit(admit)
        return outer

    def run_alone(self, call: ModelCall) -> list[Any]:
        results: list[Any] = getattr(self._predictor(call), call.method)(call.inputs, **dict(call.params))
        return results

    def run(self, call: ModelCall) -> list[Any]:
        """Run `call` (an unbatched one on the calling thread) and return its results."""
        return self.run_alone(call) if not call.batched else self.submit(call).result()


GENERATION_METHODS = ("generate", "chat")


def _configure_cpu(threads: int) -> None:
    from training.devices import configure_cpu

    configure_cpu(threads)


def _settle(outer: Future[list[Any]], inner: Future[Any]) -> None:
    exc = inner.exception()
    if exc is not None:
        outer.set_exception(exc)
    else:
        outer.set_result(inner.result())


def _publish_chunks(chunks: list[tuple[str, dict[str, Any]]]) -> None:
    """Streamed text to its callers' channels, one Redis round trip per decode step."""
    replies.push_chunks(chunks)


class EngineLost(RuntimeError):
    """The model process exited with this request in it; the next request starts a fresh one."""


class _Link:
    """One live engine child: its pipes, the calls waiting for it, and the thread reading its replies."""

    def __init__(self, lock: threading.Lock) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded process
        # Two one-way pipes (reader, writer): requests to the child, replies from it.
        child_reads, self.requests = context.Pipe(duplex=False)
        self.replies, child_writes = context.Pipe(duplex=False)
        self.process = context.Process(target=engine_main, args=(child_reads, child_writes), name="llmos-engine",
                                       daemon=True)
        self.process.start()
        # Only the child keeps its ends: when it dies, reading its replies here ends instead of hanging.
        child_reads.close()
        child_writes.close()
        self.pending: dict[int, Future[list[Any]]] = {}
        self.lost = False
        self.stopping = False
        self._ids = itertools.count()
        self._lock = lock
        threading.Thread(target=self._receive, name="engine replies", daemon=True).start()
        log.info("model process %d started", self.process.pid)

    def send(self, call: ModelCall) -> Future[list[Any]]:
        """Hand `call` to the child (with the engine's lock held: one writer on the pipe)."""
        future: Future[list[Any]] = Future()
        request_id = next(self._ids)
        self.pending[request_id] = future
        try:
            self.requests.send((request_id, call))
        except (OSError, ValueError) as exc:
            self.pending.pop(request_id, None)
            self.lost = True
            raise EngineLost(f"the model process is gone ({exc})") from exc
        return future

    def _receive(self) -> None:
        while True:
            try:
                request_id, ok, value = self.replies.recv()
            except (EOFError, OSError):
                break
            future = self.pending.pop(request_id, None)
            if future is None:
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        with self._lock:
            self.lost = True
            orphans, self.pending = self.pending, {}
        self.process.join(5)
        if self.stopping and not orphans:
            log.info("model process %d stopped", self.process.pid)
            return
        log.error("model process %d exited (code %s) with %d requests in it; the next request starts another",
                  self.process.pid, self.process.exitcode, len(orphans))
        for future in orphans.values():
            future.set_exception(EngineLost(f"the model process exited (code {self.process.exitcode})"))


class EngineProcess:
    """A `LocalRunner` in a child process: calls go to it over a pipe; a child that dies is replaced."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._link: _Link | None = None
        self._stopped = False

    def start(self) -> None:
        """Start the child now, so the first request does not wait for its imports."""
        with self._lock:
            self._live()

    def _live(self) -> _Link:
        if self._stopped:
            # A request arriving while the worker exits must not spawn a child that nothing would stop.
            raise EngineLost("the worker is shutting down")
        if self._link is None or self._link.lost:
            self._link = _Link(self._lock)
        return self._link

    def submit(self, call: ModelCall) -> Future[list[Any]]:
        with self._lock:
            link = self._live()
            try:
                return link.send(call)
            except EngineLost:
                # The child died before its replies' reader noticed; this call never reached it, so a
                # fresh child takes it.
                return self._live().send(call)

    def stop(self, timeout: float = 10.0) -> None:
        """Let the child finish what it holds and exit; kill it after `timeout` seconds."""
        with self._lock:
            link, self._link = self._link, None
            self._stopped = True
        if link is None:
            return
        # The child ends when its request pipe closes: it ignores the signals a process group gets, so
        # the worker can finish its requests first.
        link.stopping = True
        link.requests.close()
        link.process.join(timeout)
        if link.process.is_alive():
            link.process.kill()
            link.process.join(5)

    def run(self, call: ModelCall) -> list[Any]:
        return self.submit(call).result()

    def pid(self) -> int | None:
        link = self._link
        return None if link is None or link.lost else link.process.pid


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives a pickle round trip (ValueError, LookupError: the caller maps them), else its gist."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def engine_main(requests: Connection, replies: Connection) -> None:
    """The model process: run each call that arrives, and send back its results or its error."""
    # The worker decides when to stop: a signal to its process group must not kill the models under requests
    # the worker is still finishing. When the worker exits, by any means, `recv` ends and so does this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = get_settings()
    # The worker's log format; stderr is the worker's own, so these lines land in its log.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")
    import tasks.encoders  # noqa: F401  (paid here, not by the first request)
    import training.predict  # noqa: F401

    runner = LocalRunner(settings)
    send_lock = threading.Lock()

    def reply(request_id: int, future: Future[list[Any]]) -> None:
        exc = future.exception()
        if exc is not None and not isinstance(exc, ValueError | LookupError):
            log.error("inference call failed", exc_info=exc)
        message = (request_id, True, future.result()) if exc is None else (request_id, False, _portable(exc))
        with send_lock:
            try:
                replies.send(message)
            except (OSError, ValueError):
                return  # the worker is gone; the loop below ends too
            except Exception as unpicklable:  # a result that does not pickle: its caller gets why
                replies.send((request_id, False, RuntimeError(f"result not transferable: {unpicklable}")))

    while True:
        try:
            request_id, call = requests.recv()
        except (EOFError, OSError):
            return
        try:
            future = runner.submit(call)
        except Exception as exc:
            future = Future()
            future.set_exception(exc)
        future.add_done_callback(partial(reply, request_id))


_runner: Runner | None = None


def runner() -> Runner:
    """Where this process runs models: in itself unless `serve_from_engine_process` was called."""
    global _runner
    if _runner is None:
        _runner = LocalRunner(get_settings())
    return _runner


def serve_from_engine_process() -> EngineProcess:
    """Run this process's models in a child process of their own (the inference-only worker), starting it now."""
    global _runner
    engine = EngineProcess()
    engine.start()
    # Stopped by multiprocessing's own exit handler, first thing, before it signals its children (this one
    # ignores signals) and joins them. A plain atexit handler cannot be ordered before it: Celery's pool
    # library registers that handler again whenever it sets up its logger, which puts it first in line.
    multiprocessing.util.Finalize(None, engine.stop, exitpriority=10)
    _runner = engine
    return engine
