"""Dynamic batching: concurrent callers' work shares one call, a forward pass or a statement.

Inference workers batch forward passes per model and endpoint, and their row claims and writes; the API
batches the inserts and messages of concurrent online requests. Each key has a `Batcher` with its own
thread. Callers hand in their inputs and block on a future; the thread takes the oldest waiting request (of
the lane served least recently, below), waits until that request is `window_s` old (or the batch is full)
for others to join, runs them as one call and hands each caller its own slice of the results, in its input
order. While a batch runs, new
requests queue, so under load batches fill up without waiting at all. Only requests with equal `group`
share a call (generation: equal sampling parameters). When a shared call raises, each of its requests is
re-run alone, so an error fails only the requests that cause it. A batcher's thread ends after `idle_s`
without work; the registry replaces it on the next request.

Requests carry a `lane` (the tenant): batches are filled round-robin between lanes, and the next batch
starts from the lane served least recently, so a tenant with hundreds of requests waiting does not put
another tenant's single request behind all of them. Within a lane, first come, first served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# The inference workers' histogram of forward-pass sizes (rows), kept in a Redis hash that every worker
# process adds to and /metrics reads: field per bucket (its upper bound, or "+Inf", not cumulative) and "sum".
BATCH_SIZES_KEY = "llmos:metrics:inference_batch_sizes"
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def size_bucket(size: int) -> str:
    """The histogram bucket a forward pass of `size` rows counts in: the smallest bound that holds it."""
    return next((str(bound) for bound in BATCH_SIZE_BUCKETS if size <= bound), "+Inf")


# Runs one shared call: all requests' inputs, concatenated, and their common group → one result per input.
BatchRunner = Callable[[list[Any], Hashable], Sequence[Any]]


@dataclass(eq=False)
class PendingRequest:
    """One caller's inputs waiting for a batch, with the future its results go to."""

    inputs: list[Any]
    # Rows this request adds to the forward pass (generation: prompts times n).
    size: int
    group: Hashable
    lane: Hashable = None
    arrived: float = field(default_factory=time.monotonic)
    future: Future[list[Any]] = field(default_factory=Future)


class Batcher:
    """Groups requests for one model and endpoint into shared calls of at most `max_size` rows."""

    def __init__(self, name: str, run: BatchRunner, window_s: float, max_size: int, idle_s: float = 60.0,
                 log_batches: bool = True) -> None:
        self.name = name
        self.log_batches = log_batches
        self._run = run
        self.window_s = max(0.0, window_s)
        self.max_size = max(1, max_size)
        self.idle_s = idle_s
        self._pending: list[PendingRequest] = []
        # Lane → serial of the last batch that served it (never served: absent, first in line).
        self._served: dict[Hashable, int] = {}
        self._serial = 0
        self._cond = threading.Condition()
        self.closed = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher {name}", daemon=True)
        self._thread.start()

    def submit(self, inputs: list[Any], group: Hashable = None, size: int | None = None,
               lane: Hashable = None) -> Future[list[Any]] | None:
        """Queue a request; None when this batcher has closed (idle) and a new one must take it."""
        request = PendingRequest(list(inputs), len(inputs) if size is None else size, group, lane)
        with self._cond:
            if self.closed:
                return None
            self._pending.append(request)
            self._cond.notify()
        return request.future

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._execute(batch)

    def _take(self) -> list[PendingRequest] | None:
        """Block for the next batch: the oldest request and those that match its group and fit beside it."""
        with self._cond:
            idle_since = time.monotonic()
            while not self._pending:
                left = self.idle_s - (time.monotonic() - idle_since)
                if left <= 0:
                    self.closed = True
                    return None
                self._cond.wait(left)
            first = self._first()
            deadline = first.arrived + self.window_s
            while True:
                chosen = self._fitting(first)
                left = deadline - time.monotonic()
                if sum(r.size for r in chosen) >= self.max_size or left <= 0:
                    break
                self._cond.wait(left)
            taken = set(map(id, chosen))
            self._pending = [r for r in self._pending if id(r) not in taken]
            self._serial += 1
            for request in chosen:
                self._served[request.lane] = self._serial
            if len(self._served) > 10_000:
                # Lanes come and go with tenants; only those still waiting need remembering.
                waiting = {r.lane for r in self._pending}
                self._served = {lane: n for lane, n in self._served.items() if lane in waiting}
            return chosen

    def _lanes(self, group: Hashable | None = None, *, any_group: bool = False) -> dict[Hashable, list[PendingRequest]]:
        """Waiting requests by lane, each in arrival order; lanes served least recently first."""
        lanes: dict[Hashable, list[PendingRequest]] = {}
        for request in self._pending:
            if any_group or request.group == group:
                lanes.setdefault(request.lane, []).append(request)
        return dict(sorted(lanes.items(), key=lambda item: (self._served.get(item[0], 0), item[1][0].arrived)))

    def _first(self) -> PendingRequest:
        """The request the next batch is built around: the oldest of the lane served least recently."""
        return next(iter(self._lanes(any_group=True).values()))[0]

    def _fitting(self, first: PendingRequest) -> list[PendingRequest]:
        """``first`` and the requests of its group that fit beside it, taken one lane at a time in turn."""
        queues = [iter(q) for q in self._lanes(first.group).values()]
        chosen, rows = [first], first.size
        blocked: set[int] = set()
        while len(blocked) < len(queues):
            for index, queue in enumerate(queues):
                if index in blocked:
                    continue
                request = next(queue, None)
                if request is first:
                    request = next(queue, None)
                if request is None or rows + request.size > self.max_size:
                    # First come, first served within a lane: a later, smaller request does not jump ahead.
                    blocked.add(index)
                    continue
                chosen.append(request)
                rows += request.size
        return chosen

    def _execute(self, batch: list[PendingRequest]) -> None:
        inputs = [item for request in batch for item in request.inputs]
        started = time.monotonic()
        try:
            results = list(self._run(inputs, batch[0].group))
            if len(results) != len(inputs):
                raise RuntimeError(f"batch {self.name} returned {len(results)} results for {len(inputs)} inputs")
            if self.log_batches:
                log.info("batch %s: %d requests, %d inputs, waited %.0f ms, ran %.0f ms", self.name, len(batch),
                         len(inputs), (started - batch[0].arrived) * 1000, (time.monotonic() - started) * 1000)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.warning("batch %s of %d requests failed (%s); running each alone", self.name, len(batch), exc)
            for request in batch:
                self._execute([request])
            return
        start = 0
        for request in batch:
            request.future.set_result(results[start : start + len(request.inputs)])
            start += len(request.inputs)


class BatcherRegistry:
    """One live batcher per key, created on first use and replaced after it closes for idleness."""

    def __init__(self, window_s: float, max_size: int, idle_s: float = 60.0, log_batches: bool = True) -> None:
        self.window_s = window_s
        self.max_size = max_size
        self.idle_s = idle_s
        self.log_batches = log_batches
        self._batchers: dict[Hashable, Batcher] = {}
        self._lock = threading.Lock()

    def submit(
        self, key: Hashable, run: BatchRunner, inputs: list[Any], group: Hashable = None, size: int | None = None,
        lane: Hashable = None,
    ) -> Future[list[Any]]:
        """Queue `inputs` for a batch with other callers of `key`; the future of their results.

        `run` is used when this call creates the batcher; later calls share that batcher's runner.
        """
        while True:
            with self._lock:
                batcher = self._batchers.get(key)
                if batcher is None or batcher.closed:
                    name = " ".join(map(str, key)) if isinstance(key, tuple) else str(key)
                    batcher = Batcher(name, run, self.window_s, self.max_size, self.idle_s, self.log_batches)
                    self._batchers[key] = batcher
            future = batcher.submit(inputs, group, size, lane)
            if future is not None:
                return future

    def call(
        self, key: Hashable, run: BatchRunner, inputs: list[Any], group: Hashable = None, size: int | None = None,
        lane: Hashable = None,
    ) -> list[Any]:
        """`submit`, then wait: the results of `inputs`, or the batch's error."""
        return self.submit(key, run, inputs, group, size, lane).result()
