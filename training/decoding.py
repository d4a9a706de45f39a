"""Continuous batching for generation: requests join and leave one running decode batch between steps.

A `DecodeLoop` serves one generation model. Its thread keeps a batch of sequences in flight, each a row of
one padded KV cache with its attention mask. Between decode steps it admits waiting requests (their prompts
run through the model together, and their cache rows join the batch, left-padded to a common width) and
drops the sequences that finished, each by its own stop conditions: an end token, a stop string,
`max_tokens` or the model's time limit. So a request never waits for a batch that started before it to end,
and a short answer never keeps its row busy after it is done, where one `generate` call per batch kept both.

Left padding keeps every sequence's newest token in the last column, so one step feeds one token per row;
positions are counted per row, so a row's answer does not depend on the padding beside it (equal to the
answer alone up to float rounding). Sampling is per row, with the request's temperature and top_p, and a
seeded request draws from its own generator: requests with different settings share steps.

Streaming requests get their text as it grows: after each step the loop hands the new text of every
streamed sequence to `publish`, in one call, holding back what could still turn out to be a stop string.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

# Below this, sampling is greedy (see `training.predict`).
GREEDY_BELOW_TEMPERATURE = 1e-4

# (stream key, chunk) pairs: the text each streamed sequence gained in one step.
Publish = Callable[[list[tuple[str, dict[str, Any]]]], None]


@dataclass(eq=False)
class GenerationRequest:
    """One request's prompts (token IDs), sampling settings and the future its choices go to."""

    encoded: list[list[int]]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    lane: Hashable = None
    # Where its text goes as it grows (a reply-channel key), for `stream: true`; None: only the result.
    stream: str | None = None
    future: Future[list[list[dict[str, Any]]]] = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    # Finished choices by prompt, each keyed by its number among the prompt's n.
    finished: list[dict[int, dict[str, Any]]] = field(default_factory=list)
    open_rows: int = 0
    generator: torch.Generator | None = None

    @property
    def size(self) -> int:
        return len(self.encoded) * self.n


@dataclass(eq=False)
class _Row:
    """One sequence in flight: a prompt's `choice`-th completion."""

    request: GenerationRequest
    prompt_index: int
    choice: int
    prompt: list[int]
    deadline: float | None
    generated: list[int] = field(default_factory=list)
    # Text already sent to the stream.
    sent: str = ""

    @property
    def index(self) -> int:
        """The choice's index in the response: OpenAI numbers prompt i's n completions i*n … i*n+n-1."""
        return self.prompt_index * self.request.n + self.choice


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros prepended along `dim` up to `width`."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _cache_of(output: Any) -> Any:
    """A forward pass's KV cache, under its name in this transformers version."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def _cache_layers(cache: Any) -> list[Any]:
    layers: list[Any] = cache.layers
    return layers


def held_back(text: str, stops: list[str]) -> str:
    """The part of `text` safe to stream: without a trailing partial character, or a possible stop string's start.

    A stop string that the next tokens complete must not have been sent already: the answer ends before it.
    """
    safe = text.rstrip("\ufffd")  # a character split across tokens decodes as U+FFFD until it is whole
    for stop in stops:
        for k in range(min(len(stop) - 1, len(safe)), 0, -1):
            if stop.startswith(safe[-k:]):
                safe = safe[:-k]
                break
    return safe


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from one row's logits: greedy below a tiny temperature, else nucleus sampling.

    OpenAI's sampling: temperature, then the smallest set of tokens whose probability reaches `top_p`
    (no top-k cut).
    """
    if temperature < GREEDY_BELOW_TEMPERATURE:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        # Keep a token while the mass before it is below top_p: the first token always stays.
        keep = ordered.cumsum(-1) - ordered < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class DecodeLoop:
    """One generation model's decode batch, served by a thread that admits requests between steps.

    `predictor` is a `training.predict.GenerationPredictor` (its model, tokenizer, stop tokens and lock).
    At most `max_rows` sequences are in flight; a request bigger than that runs when the batch is empty. The
    thread ends after `idle_s` without work (`closed`); the owner then starts a new loop.
    """

    def __init__(self, name: str, predictor: Any, max_rows: int, idle_s: float = 60.0,
                 publish: Publish | None = None, record: Callable[[int], None] | None = None,
                 prepare: Callable[[], None] | None = None) -> None:
        self.name = name
        # Run first on the loop's thread: CPU settings that are per thread (denormal flushing).
        self.prepare = prepare
        # Told each decode step's rows (the workers' forward-pass size histogram).
        self.record = record
        self.predictor = predictor
        self.max_rows = max(1, max_rows)
        self.idle_s = idle_s
        self.publish = publish
        self.closed = False
        self.steps = 0
        self.widest = 0  # the most sequences one step has carried, for tests and logs
        self._waiting: list[GenerationRequest] = []
        self._served: dict[Hashable, int] = {}
        self._serial = 0
        self._cond = threading.Condition()
        # The batch in flight: rows, their cache, their attention mask and the logits of their next token.
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        # transformers renamed `past_key_values` to `cache` (5.2x), keeping the old name for a while, deprecated.
        self._cache_arg = ("cache" if "cache" in inspect.signature(predictor.model.forward).parameters
                           else "past_key_values")
        self._thread = threading.Thread(target=self._loop, name=f"decode {name}", daemon=True)
        self._thread.start()

    # --- the callers' side ---

    def submit(self, request: GenerationRequest) -> Future[list[list[dict[str, Any]]]] | None:
        """Queue a request (already checked); None when this loop has closed and a new one must take it."""
        request.finished = [{} for _ in request.encoded]
        request.open_rows = request.size
        if request.seed is not None:
            # Its own generator: the answer depends on the seed only, not on the requests it runs beside.
            request.generator = torch.Generator(device=self.predictor.device).manual_seed(request.seed)
        with self._cond:
            if self.closed:
                return None
            self._waiting.append(request)
            self._cond.notify()
        return request.future

    # --- the loop ---

    def _loop(self) -> None:
        if self.prepare is not None:
            self.prepare()
        while True:
            admitted = self._admit()
            if admitted is None:
                return
            try:
                # One lock for the step: the tokenizer (decoding here) must not run beside an admission
                # thread's encoding, and a batch-file call on the same predictor waits for the step.
                with self.predictor.lock:
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._advance()
            except Exception as exc:  # a failed forward pass fails the requests in it, not the loop
                log.exception("decode step of %s failed", self.name)
                failed = {id(r.request): r.request for r in self._rows}
                failed.update((id(request), request) for request in admitted)
                for request in failed.values():
                    if not request.future.done():
                        request.future.set_exception(exc)
                self._reset()

    def _admit(self) -> list[GenerationRequest] | None:
        """Take the waiting requests that fit beside the rows in flight (tenants in turn); block when idle."""
        with self._cond:
            idle_since = time.monotonic()
            while not self._waiting and not self._rows:
                left = self.idle_s - (time.monotonic() - idle_since)
                if left <= 0:
                    self.closed = True
                    return None
                self._cond.wait(left)
            rows = len(self._rows)
            lanes: dict[Hashable, list[GenerationRequest]] = {}
            for request in self._waiting:
                lanes.setdefault(request.lane, []).append(request)
            # The lane admitted least recently first, then the oldest request: one tenant's flood of requests
            # does not keep another tenant's out of the batch.
            order = sorted(lanes.values(), key=lambda queue: (self._served.get(queue[0].lane, 0), queue[0].arrived))
            taken: list[GenerationRequest] = []
            exhausted: set[int] = set()
            room = True
            while room and len(exhausted) < len(order):
                for index, queue in enumerate(order):
                    if index in exhausted:
                        continue
                    if not queue:
                        exhausted.add(index)
                        continue
                    # A request bigger than the batch runs alone once the batch is empty.
                    if rows + queue[0].size > self.max_rows and (rows or taken):
                        # The request whose turn it is waits for room, and nothing behind it goes first:
                        # otherwise a request of many prompts (or n) could wait forever while small ones
                        # keep taking the rows that finish.
                        room = False
                        break
                    request = queue.pop(0)
                    taken.append(request)
                    rows += request.size
                    self._serial += 1
                    self._served[request.lane] = self._serial
            picked = set(map(id, taken))
            self._waiting = [r for r in self._waiting if id(r) not in picked]
            if len(self._served) > 10_000:
                waiting = {r.lane for r in self._waiting}
                self._served = {lane: n for lane, n in self._served.items() if lane in waiting}
            return taken

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        """Run the new prompts through the model and add their rows to the batch in flight."""
        predictor = self.predictor
        now = time.monotonic()
        deadline = None if predictor.max_seconds is None else now + predictor.max_seconds
        prompts = [(request, i, ids) for request in requests for i, ids in enumerate(request.encoded)]
        width = max(len(ids) for _, _, ids in prompts)
        pad = int(predictor.tokenizer.pad_token_id)
        device = predictor.device
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, _, ids in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, _, ids in prompts], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = predictor.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                  logits_to_keep=1)
        cache, logits = _cache_of(out), out.logits[:, -1, :]
        # n completions of a prompt share its prompt's pass: its cache row is repeated n times.
        repeat = torch.tensor([request.n for request, _, _ in prompts], device=device)
        if int(repeat.max()) > 1:
            expand = torch.repeat_interleave(torch.arange(len(prompts), device=device), repeat)
            cache.batch_select_indices(expand)
            mask, logits = mask[expand], logits[expand]
        rows = [_Row(request, i, choice, ids, deadline)
                for request, i, ids in prompts for choice in range(request.n)]
        in_flight = len(self._rows)
        self._join(rows, cache, mask, logits)
        log.info("decode %s: %d requests (%d sequences) joined %d in flight, prefill %.0f ms", self.name,
                 len(requests), len(rows), in_flight, (time.monotonic() - now) * 1000)

    def _join(self, rows: list[_Row], cache: Any, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Add rows to the batch in flight: both caches left-padded to the wider one, stacked on the batch axis."""
        if not self._rows or self._mask is None or self._logits is None:
            self._rows, self._cache, self._mask, self._logits = rows, cache, mask, logits
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(_cache_layers(self._cache), _cache_layers(cache), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)])
        self._logits = torch.cat([self._logits, logits])
        self._rows = self._rows + rows

    def _advance(self) -> None:
        """Sample every row's next token, finish the rows that end, and run one decode step for the rest."""
        assert self._mask is not None and self._logits is not None
        predictor = self.predictor
        # Greedy rows in one argmax over the batch; sampled rows one by one, each with its own settings.
        greedy = self._logits.argmax(dim=-1).tolist()
        tokens = [greedy[i] if row.request.temperature < GREEDY_BELOW_TEMPERATURE
                  else sample(self._logits[i], row.request.temperature, row.request.top_p, row.request.generator)
                  for i, row in enumerate(self._rows)]
        self.widest = max(self.widest, len(self._rows))
        now = time.monotonic()
        chunks: list[tuple[str, dict[str, Any]]] = []
        keep: list[int] = []
        complete: list[GenerationRequest] = []
        for i, (row, token) in enumerate(zip(self._rows, tokens, strict=True)):
            choice = self._step_row(row, token, now, chunks)
            if choice is None:
                keep.append(i)
                continue
            request = row.request
            request.finished[row.prompt_index][row.choice] = choice
            request.open_rows -= 1
            if request.open_rows == 0:
                complete.append(request)
        if chunks and self.publish is not None:
            # Before the answers: a streamed request's reply is pushed after its last chunk.
            try:
                self.publish(chunks)
            except Exception:  # the answers still come whole; a stream that lost chunks ends with them
                log.warning("streamed text of %d sequences not published", len(chunks), exc_info=True)
        for request in complete:
            request.future.set_result([[done[k] for k in sorted(done)] for done in request.finished])
        if len(keep) < len(self._rows):
            if not keep:
                self._reset()
                return
            self._select(keep)
        self.steps += 1
        if self.record is not None:
            self.record(len(keep))
        device = predictor.device
        last = torch.tensor([[tokens[i]] for i in keep], device=device)
        positions = torch.tensor([[len(self._rows[j].prompt) + len(self._rows[j].generated) - 1]
                                  for j in range(len(keep))], device=device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(keep), 1))], dim=1)
        with torch.inference_mode():
            out = predictor.model(input_ids=last, attention_mask=mask, position_ids=positions,
                                  use_cache=True, **{self._cache_arg: self._cache})
        self._cache, self._mask, self._logits = _cache_of(out), mask, out.logits[:, -1, :]

    def _step_row(self, row: _Row, token: int, now: float, chunks: list[tuple[str, dict[str, Any]]]
                  ) -> dict[str, Any] | None:
        """Add `token` to the row; its finished choice when it ends here, else None (and its stream chunk)."""
        predictor = self.predictor
        request = row.request
        if token in predictor.stop_ids:
            return self._finish(row, "stop", eos=True, chunks=chunks)
        row.generated.append(token)
        text = None
        if request.stops:
            text = predictor.decode_continuation(row.prompt, row.generated)
            cut = min((i for i in (text.find(s) for s in request.stops) if i >= 0), default=-1)
            if cut >= 0:
                return self._finish(row, "stop", text=text[:cut], chunks=chunks)
        if len(row.generated) >= request.max_tokens or (row.deadline is not None and now >= row.deadline):
            return self._finish(row, "length", text=text, chunks=chunks)
        if request.stream is not None:
            if text is None:
                text = predictor.decode_continuation(row.prompt, row.generated)
            self._send(row, held_back(text, request.stops), chunks)
        return None

    def _finish(self, row: _Row, reason: str, chunks: list[tuple[str, dict[str, Any]]], text: str | None = None,
                eos: bool = False) -> dict[str, Any]:
        if text is None:
            text = self.predictor.decode_continuation(row.prompt, row.generated)
        if row.request.stream is not None:
            self._send(row, text, chunks, finish_reason=reason)
        # The end token counts as generated, as OpenAI counts it; a stop string's tokens are the text's own.
        return {"text": text, "finish_reason": reason, "prompt_tokens": len(row.prompt),
                "completion_tokens": len(row.generated) + (1 if eos else 0)}

    @staticmethod
    def _send(row: _Row, text: str, chunks: list[tuple[str, dict[str, Any]]], finish_reason: str | None = None
              ) -> None:
        # Text already sent stays sent: a decode that rewrites it (rare tokenizer clean-ups) streams nothing
        # more until the final text, whose new part goes out then.
        delta = text[len(row.sent):] if text.startswith(row.sent) else ""
        if not delta and finish_reason is None:
            return
        row.sent += delta
        assert row.request.stream is not None
        chunks.append((row.request.stream, {"index": row.index, "text": delta, "finish_reason": finish_reason}))

    def _select(self, keep: list[int]) -> None:
        """Keep only rows `keep` of the batch, and drop the cache columns no remaining row attends to."""
        assert self._mask is not None and self._logits is not None
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask, self._logits = self._mask[index], self._logits[index]
        self._rows = [self._rows[i] for i in keep]
        # Left columns that are padding in every remaining row: the longest sequence left.
        used = self._mask.any(dim=0)
        first = int(used.nonzero()[0]) if bool(used.any()) else 0
        if first > 0:
            self._mask = self._mask[:, first:]
            for layer in _cache_layers(self._cache):
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._logits = [], None, None, None


class DecodeLoops:
    """One live `DecodeLoop` per model, started on first use and replaced after it closes for idleness."""

    def __init__(self, max_rows: int, idle_s: float = 60.0, publish: Publish | None = None,
                 record: Callable[[int], None] | None = None, prepare: Callable[[], None] | None = None) -> None:
        self.max_rows = max_rows
        self.idle_s = idle_s
        self.publish = publish
        self.record = record
        self.prepare = prepare
        self._loops: dict[Hashable, DecodeLoop] = {}
        self._lock = threading.Lock()

    def submit(self, key: Hashable, predictor: Any, request: GenerationRequest
               ) -> Future[list[list[dict[str, Any]]]]:
        while True:
            with self._lock:
                loop = self._loops.get(key)
                if loop is None or loop.closed or loop.predictor is not predictor:
                    # A model reloaded since (evicted, then asked for again) gets a loop of its own; the old
                    # loop finishes what it holds and closes when idle.
                    loop = DecodeLoop(str(key), predictor, self.max_rows, self.idle_s, self.publish, self.record,
                                      self.prepare)
                    self._loops[key] = loop
            future = loop.submit(request)
            if future is not None:
                return future

    def loop(self, key: Hashable) -> DecodeLoop | None:
        with self._lock:
            return self._loops.get(key)
