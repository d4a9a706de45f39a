"""Batches: validate the input file (queue cpu), run it chunk by chunk (queue inference), then finalise.

Chunks run one after another: each finished chunk sends the next, so online requests on the inference
queue interleave with a long batch instead of waiting behind all of it. A chunk's output and error lines
are written to attempt-specific files and fsynced before the chunk is marked done in the same
transaction that adds its counts, so a crash redoes at most the chunk that was running.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Task
from pydantic import BaseModel, ValidationError

from core import ids
from core.clock import utcnow
from core.settings import get_settings
from db import batches as batches_repo
from db.models import BatchChunk, File, Model
from db.session import relaxed_engine, transaction
from domain import batches, dispatch, storage
from domain.requests import ChatRequest, ClassificationRequest, CompletionRequest, EmbeddingRequest, NerRequest
from domain.storage import file_path
from infra import objectstore  # noqa: F401  (installs the object store for LLMOS_STORAGE_URL)
from tasks import serving
from tasks.app import celery_app
from tasks.inference import model_call, respond, response_body

log = logging.getLogger(__name__)

# Shown in a failed batch's `errors`; the rest are counted in the message of the last one.
MAX_ERRORS_SHOWN = 100
MAX_CUSTOM_ID = 512
LINE_KEYS = {"custom_id", "method", "url", "body"}
PLAN_DIR = "plan"
VALIDATION_ERRORS = "validation.err.jsonl"
STOP_TARGETS = {"cancelled": batches.CANCELLED, "expired": batches.EXPIRED, "failed": batches.FAILED}


def work_dir(batch_id: str) -> Path:
    """Where a batch keeps its plan and chunk results on this machine until it is finalised."""
    return get_settings().artifacts_dir / "batches" / batch_id


def work_key(batch_id: str) -> str:
    """The storage key of `work_dir`: with object storage, the plan and each chunk's results are published
    under it, so chunks and settling may run on any machine."""
    return f"batches/{batch_id}"


def _local_copy(location: str) -> Path | None:
    """A local path of a published work file, or None when there is none (nothing of that kind was written)."""
    try:
        return storage.materialize(location)
    except FileNotFoundError:
        return None


def _worker_name(task: Task) -> str:
    return f"{task.request.hostname or socket.gethostname()}:{os.getpid()}"


def _write_blocks(path: Path, blocks: Iterable[bytes]) -> int:
    """Write bytes atomically and durably (tmp, fsync, rename); returns the byte count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    size = 0
    with tmp.open("wb") as out:
        for block in blocks:
            size += len(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    return size


def _encoded(records: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    for record in records:
        yield (json.dumps(record, ensure_ascii=False) + "\n").encode()


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write JSON Lines atomically and durably; returns the byte count."""
    return _write_blocks(path, _encoded(records))


def _file_blocks(paths: Iterable[Path]) -> Iterator[bytes]:
    """The files' bytes one after another, in blocks (chunk outputs are already final lines)."""
    for path in paths:
        if path.exists():
            with path.open("rb") as data:
                yield from iter(lambda: data.read(1 << 20), b"")


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def _send_chunk(session: Any, chunk: BatchChunk) -> None:
    dispatch.enqueue_after_commit(session, batches.TASK_RUN_CHUNK, chunk.batch_id, chunk.seq, chunk.task_id,
                                  task_id=chunk.task_id, queue=dispatch.QUEUE_INFERENCE)


def send_settle(session: Any, batch_id: str) -> None:
    """Stage a settle pass for after commit (cpu queue); it finalises the batch once nothing runs."""
    dispatch.enqueue_after_commit(session, batches.TASK_SETTLE, batch_id, queue=dispatch.QUEUE_CPU, once=True)


class Heartbeat:
    """Beats on the batch row from a thread while work runs, and notices a request to stop."""

    def __init__(self, batch_id: str) -> None:
        self.batch_id = batch_id
        self.stop_requested = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{batch_id}", daemon=True)

    def _run(self) -> None:
        period = get_settings().heartbeat_seconds
        while not self._done.wait(period):
            try:
                with transaction() as session:
                    state = batches_repo.heartbeat(session, self.batch_id)
            except Exception:
                log.warning("batch %s: heartbeat failed", self.batch_id, exc_info=True)
                continue
            if state is None or state[1] is not None or state[0] in batches.TERMINAL:
                self.stop_requested.set()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


@dataclass
class LinePlan:
    """What validation learnt about one input line: a request to run, or the error that stops it."""

    line: int
    custom_id: str | None
    payload: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def _request_schema(endpoint: str) -> type[BaseModel]:
    # The online endpoints' own request classes, so a line is valid exactly when the same body sent
    # online would be.
    table: dict[str, type[BaseModel]] = {
        "/v1/classifications": ClassificationRequest, "/v1/ner": NerRequest, "/v1/embeddings": EmbeddingRequest,
        "/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest,
    }
    return table[endpoint]


def _payload(endpoint: str, body: Any) -> dict[str, Any]:
    """The request the online endpoint would hand its inference worker for this validated body."""
    if endpoint in ("/v1/classifications", "/v1/embeddings"):
        payload: dict[str, Any] = body.payload()
        return payload
    if endpoint == "/v1/ner":
        return {"model": body.model, "input": body.inputs()}
    if endpoint == "/v1/completions":
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        return {"model": body.model, "prompt": prompts, **body.sampling()}
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    return {"model": body.model, "messages": messages, **body.sampling()}


def _pydantic_error(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    param = f"body.{loc}" if loc else "body"
    return param, f"{param}: {first.get('msg')}"


class LineChecker:
    """Validates input lines one by one; remembers custom_ids and model verdicts across lines."""

    def __init__(self, session: Any, tenant_id: str, endpoint: str) -> None:
        self.session = session
        self.tenant_id = tenant_id
        self.endpoint = endpoint
        self.schema = _request_schema(endpoint)
        self.seen: set[str] = set()
        self.models: dict[tuple[str, str], dict[str, Any] | None] = {}

    def check(self, line: int, text: str) -> LinePlan:
        def bad(code: str, message: str, param: str | None = None, custom_id: str | None = None) -> LinePlan:
            return LinePlan(line, custom_id, error=batches.line_error(code, f"line {line}: {message}", param, line))

        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            return bad("invalid_json_line", f"not valid JSON ({exc.msg} at column {exc.colno})")
        except ValueError as exc:  # numbers too long to convert, say
            return bad("invalid_json_line", f"not valid JSON ({exc})")
        if not isinstance(obj, dict):
            return bad("invalid_json_line", "each line must be a JSON object")
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID or "\x00" in custom_id:
            return bad("invalid_custom_id", f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} "
                       "characters", "custom_id")
        unknown = sorted(set(obj) - LINE_KEYS)
        if unknown:
            return bad("unexpected_field", f"unknown field '{unknown[0]}'; a line holds custom_id, method, url "
                       "and body", unknown[0], custom_id)
        if custom_id in self.seen:
            return bad("duplicate_custom_id", f"custom_id '{custom_id}' appears on an earlier line", "custom_id",
                       custom_id)
        self.seen.add(custom_id)
        if obj.get("method") != "POST":
            return bad("invalid_method", "method must be \"POST\"", "method", custom_id)
        if obj.get("url") != self.endpoint:
            return bad("invalid_url", f"url {json.dumps(obj.get('url'))} does not match the batch's endpoint "
                       f"'{self.endpoint}'", "url", custom_id)
        body = obj.get("body")
        if not isinstance(body, dict):
            return bad("invalid_request", "body must be a JSON object", "body", custom_id)
        try:
            parsed = self.schema.model_validate(body)
        except ValidationError as exc:
            param, message = _pydantic_error(exc)
            return bad("invalid_request", message, param, custom_id)
        problem = self._model_problem(str(body["model"]), batches.line_task(self.endpoint, body))
        if problem is not None:
            return bad(problem["code"], problem["message"], problem["param"], custom_id)
        return LinePlan(line, custom_id, payload=_payload(self.endpoint, parsed))

    def _model_problem(self, model_id: str, task: str) -> dict[str, Any] | None:
        if (model_id, task) not in self.models:
            with relaxed_engine().connect() as conn:
                self.models[model_id, task] = batches.serving_problem(conn, self.tenant_id, model_id, task)
        return self.models[model_id, task]


def _error_record(custom_id: str | None, error: dict[str, Any], response: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    return {"id": ids.new_id(ids.BATCH_REQUEST), "custom_id": custom_id, "response": response, "error": error}


def plan_file(plan_dir: Path, seq: int) -> Path:
    return plan_dir / f"chunk-{seq:05d}.jsonl"


@celery_app.task(name=batches.TASK_VALIDATE)
def validate_batch(batch_id: str) -> None:
    """validating → in_progress with chunks planned (bad lines kept for the error file), or failed."""
    settings = get_settings()
    started = time.perf_counter()
    with transaction() as session:
        batch = batches_repo.get_batch_by_id(session, batch_id, lock=True)
        if batch is None or batch.status != batches.VALIDATING:
            log.info("validate batch %s: nothing to do (%s)", batch_id, batch and batch.status)
            return
        # Counted before the work: a run that crashes (a bug, a worker killed by the OOM killer on a huge
        # file) never gets to record itself, and the reconciler must not resend it forever.
        batch.validation_attempts += 1
        tenant_id, endpoint = batch.tenant_id, batch.endpoint
        source = session.get(File, batch.input_file_id)
        source_location = None
        if source is not None and source.tenant_id == tenant_id and source.deleted_at is None:
            source_location = source.path
    staging = work_dir(batch_id) / f"plan-{ids.random_token(12)}"
    total = valid = 0
    errors: list[dict[str, Any]] = []
    chunk_sizes: list[int] = []
    file_error: dict[str, Any] | None = None
    with Heartbeat(batch_id), transaction() as session:
        checker = LineChecker(session, tenant_id, endpoint)
        pending: list[dict[str, Any]] = []

        def flush() -> None:
            _write_jsonl(plan_file(staging, len(chunk_sizes)), pending)
            chunk_sizes.append(len(pending))
            pending.clear()

        try:
            if source_location is None:
                raise FileNotFoundError(batch_id)
            source_path = storage.materialize(source_location)
            with source_path.open(encoding="utf-8") as lines:
                for number, text in enumerate(lines, start=1):
                    if not text.strip():
                        continue  # blank lines (a trailing newline, say) are not requests
                    total += 1
                    plan = checker.check(number, text)
                    if plan.error is not None:
                        errors.append({"line": number, **_error_record(plan.custom_id, plan.error)})
                        continue
                    valid += 1
                    pending.append({"line": number, "custom_id": plan.custom_id, "payload": plan.payload})
                    if len(pending) >= settings.batch_chunk_lines:
                        flush()
            if pending:
                flush()
        except FileNotFoundError:
            file_error = batches.line_error("file_not_found", "the input file was deleted", "input_file_id")
        except UnicodeDecodeError:
            file_error = batches.line_error("invalid_file", "the input file is not UTF-8 text", "input_file_id")
        if file_error is None:
            _write_jsonl(staging / VALIDATION_ERRORS, errors)
    with transaction() as session:
        batch = batches_repo.get_batch_by_id(session, batch_id, lock=True)
        if batch is None or batch.status != batches.VALIDATING:
            # Cancelled or expired while validating: settling has already recorded that.
            shutil.rmtree(staging, ignore_errors=True)
            return
        if batch.stop_reason is not None:
            shutil.rmtree(staging, ignore_errors=True)
            send_settle(session, batch_id)
            return
        batch.heartbeat_at = utcnow()
        if file_error is not None or valid == 0:
            if file_error is None:
                shown = [e["error"] for e in errors[:MAX_ERRORS_SHOWN]]
                if not shown:
                    shown = [batches.line_error("empty_file", "the input file holds no request lines",
                                                "input_file_id")]
                batch.errors = batches.error_list(shown)
            else:
                batch.errors = batches.error_list([file_error])
            batch.total, batch.failed = total, total
            batches.transition(session, batch, batches.FAILED)
            shutil.rmtree(work_dir(batch_id), ignore_errors=True)
            return
        plan_dir = work_dir(batch_id) / PLAN_DIR
        shutil.rmtree(plan_dir, ignore_errors=True)
        staging.replace(plan_dir)  # under the row lock: exactly one validation's plan is used
        storage.publish(plan_dir, f"{work_key(batch_id)}/{PLAN_DIR}")
        batch.total, batch.failed, batch.chunk_count = total, len(errors), len(chunk_sizes)
        for seq, size in enumerate(chunk_sizes):
            session.add(BatchChunk(batch_id=batch_id, seq=seq, line_count=size, status="pending", attempts=0,
                                   task_id=ids.random_token(32), completed=0, failed=0))
        session.flush()
        batches.transition(session, batch, batches.IN_PROGRESS)
        first = batches_repo.next_chunk(session, batch_id)
        assert first is not None
        _send_chunk(session, first)
    log.info("batch %s: %d lines, %d valid, %d chunks, validated in %.2fs", batch_id, total, valid,
             len(chunk_sizes), time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------------
# Running a chunk
# --------------------------------------------------------------------------------------------------------


@dataclass
class LineResult:
    entry: int  # position in the chunk
    record: dict[str, Any]
    failed: bool


def _failure_reply(exc: Exception) -> tuple[int, dict[str, Any]]:
    """Status and error of a request that could not be served, as the online endpoint answers it."""
    if isinstance(exc, ValueError):
        return 400, {"message": str(exc), "type": "invalid_request_error", "param": getattr(exc, "param", None),
                     "code": "invalid_request"}
    if isinstance(exc, LookupError):
        return 404, {"message": str(exc), "type": "invalid_request_error", "param": None,
                     "code": "model_not_found"}
    return 500, {"message": f"inference failed: {type(exc).__name__}", "type": "server_error", "param": None,
                 "code": "inference_error"}


def _success(custom_id: str, body: dict[str, Any], request_id: str, line_id: str) -> dict[str, Any]:
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def _failure(custom_id: str, line: int, exc: Exception, request_id: str, line_id: str) -> dict[str, Any]:
    status, error = _failure_reply(exc)
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": {"error": error}},
            "error": batches.line_error(error["code"], f"line {line}: {error['message']}", None, line)}


def _new_ids() -> tuple[str, str]:
    token = ids.random_token()
    return f"{ids.BATCH_REQUEST}{token}", f"req_{token}"


def _run_encoder_group(endpoint: str, model: Model, group: list[tuple[int, dict[str, Any]]]) -> list[LineResult]:
    """All lines of one model and method in one predictor call; a failing call is retried line by line to place
    the blame (and a line whose answer cannot be built, a `dimensions` too large, fails alone)."""
    calls = [model_call(endpoint, model.id, model.path, entry["payload"], entry["custom_id"]) for _, entry in group]
    inputs = [item for call in calls for item in call.inputs]
    outputs: list[Any] = []
    failure: Exception | None = None
    try:
        outputs = serving.runner().run(serving.ModelCall(model.id, model.path, calls[0].task, calls[0].method,
                                                         inputs, batched=False))
    except Exception as exc:
        if len(group) > 1:
            return [result for item in group for result in _run_encoder_group(endpoint, model, [item])]
        failure = exc
    results = []
    start = 0
    for (position, entry), call in zip(group, calls, strict=True):
        line_id, request_id = _new_ids()
        mine, start = outputs[start : start + len(call.inputs)], start + len(call.inputs)
        try:
            if failure is not None:
                raise failure
            body = response_body(endpoint, model.id, request_id, mine, entry["payload"])
            record, failed = _success(entry["custom_id"], body, request_id, line_id), False
        except Exception as exc:
            if not isinstance(exc, ValueError | LookupError):
                log.exception("batch line %s failed", entry["custom_id"])
            record, failed = _failure(entry["custom_id"], entry["line"], exc, request_id, line_id), True
        results.append(LineResult(position, record, failed))
    return results


def _load_models(tenant_id: str, entries: list[dict[str, Any]]) -> dict[str, Model | None]:
    """The chunk's models, as rows detached from any session; None for one deleted since validation."""
    wanted = {entry["payload"]["model"] for entry in entries}
    found: dict[str, Model | None] = {}
    with transaction() as session:
        for model_id in wanted:
            row = session.get(Model, model_id)
            usable = row is not None and row.deleted_at is None and row.tenant_id in (None, tenant_id)
            if usable:
                session.expunge(row)
            found[model_id] = row if usable else None
    for model_id, row in found.items():
        if row is None:
            continue
        try:
            # A detached row, never written back: its path now names this machine's copy of the model.
            row.path = str(storage.materialize(row.path))
        except FileNotFoundError:
            found[model_id] = None
    return found


def run_lines(endpoint: str, tenant_id: str, entries: list[dict[str, Any]], stopped: Callable[[], bool]
              ) -> list[LineResult]:
    """Answer the chunk's lines (encoders grouped by model, one call each); stops early when asked to."""
    models = _load_models(tenant_id, entries)
    results: list[LineResult] = []
    missing = [(i, e) for i, e in enumerate(entries) if models[e["payload"]["model"]] is None]
    for position, entry in missing:
        line_id, request_id = _new_ids()
        gone = LookupError(f"model '{entry['payload']['model']}' no longer exists")
        results.append(LineResult(position, _failure(entry["custom_id"], entry["line"], gone, request_id, line_id),
                                  True))
    runnable = [(i, e) for i, e in enumerate(entries) if models[e["payload"]["model"]] is not None]
    if endpoint in ("/v1/classifications", "/v1/ner", "/v1/embeddings"):
        # Zero-shot lines (with labels) run on the encoder's embeddings, apart from its classifier's lines.
        groups: dict[tuple[str, bool], list[tuple[int, dict[str, Any]]]] = {}
        for position, entry in runnable:
            zero_shot = entry["payload"].get("labels") is not None
            groups.setdefault((entry["payload"]["model"], zero_shot), []).append((position, entry))
        for (model_id, _), group in groups.items():
            if stopped():
                break
            model = models[model_id]
            assert model is not None
            results.extend(_run_encoder_group(endpoint, model, group))
    else:
        for position, entry in runnable:
            if stopped():
                break
            model = models[entry["payload"]["model"]]
            assert model is not None
            line_id, request_id = _new_ids()
            try:
                body = respond(endpoint, model.id, model.path, entry["payload"], request_id)
                results.append(LineResult(position, _success(entry["custom_id"], body, request_id, line_id), False))
            except Exception as exc:
                if not isinstance(exc, ValueError | LookupError):
                    log.exception("batch line %s failed", entry["custom_id"])
                results.append(LineResult(position, _failure(entry["custom_id"], entry["line"], exc, request_id,
                                                             line_id), True))
    return sorted(results, key=lambda r: r.entry)


@celery_app.task(name=batches.TASK_RUN_CHUNK, bind=True)
def run_chunk(self: Task, batch_id: str, seq: int, task_id: str) -> None:
    """Claim one chunk, answer its lines, record them durably with the counts, and send the next chunk."""
    worker = _worker_name(self)
    started = time.perf_counter()
    with transaction() as session:
        batch = batches_repo.get_batch_by_id(session, batch_id, lock=True)
        if batch is None or batch.status in batches.TERMINAL:
            return
        if batch.stop_reason is not None or batch.status != batches.IN_PROGRESS:
            send_settle(session, batch_id)
            return
        chunk = batches_repo.claim_chunk(session, batch_id, seq, task_id, worker)
        if chunk is None:
            log.info("batch %s chunk %d: not pending under this send; a duplicate or stale delivery", batch_id, seq)
            return
        batch.heartbeat_at = utcnow()
        attempt, endpoint, tenant_id = chunk.attempts, batch.endpoint, batch.tenant_id
    plan_location = storage.location(f"{work_key(batch_id)}/{PLAN_DIR}/{plan_file(Path(), seq).name}")
    entries = list(_read_jsonl(storage.materialize(plan_location)))
    with Heartbeat(batch_id) as heartbeat:
        answering = time.perf_counter()
        results = run_lines(endpoint, tenant_id, entries, heartbeat.stop_requested.is_set)
        answered = time.perf_counter() - answering
    base = work_dir(batch_id) / f"chunk-{seq:05d}-a{attempt}"
    output_path, error_path = base.with_suffix(".out.jsonl"), base.with_suffix(".err.jsonl")
    _write_jsonl(output_path, (r.record for r in results if not r.failed))
    # Error lines carry their line number, so the final error file can merge them in input order.
    _write_jsonl(error_path, ({"line": entries[r.entry]["line"], **r.record} for r in results if r.failed))
    failed = sum(r.failed for r in results)
    output_location = storage.publish(output_path, f"{work_key(batch_id)}/{output_path.name}")
    error_location = storage.publish(error_path, f"{work_key(batch_id)}/{error_path.name}")
    with transaction() as session:
        batch = batches_repo.get_batch_by_id(session, batch_id, lock=True)
        row = session.get(BatchChunk, (batch_id, seq), with_for_update=True)
        if batch is None or row is None or batch.status in batches.TERMINAL or row.status != "running" \
                or row.attempts != attempt:
            log.warning("batch %s chunk %d attempt %d: no longer ours; its results are dropped", batch_id, seq,
                        attempt)
            return
        row.status, row.finished_at = "done", utcnow()
        row.completed, row.failed = len(results) - failed, failed
        row.output_path, row.error_path = output_location, error_location
        batch.completed += row.completed
        batch.failed += row.failed
        batch.heartbeat_at = batch.updated_at = utcnow()
        following = batches_repo.next_chunk(session, batch_id)
        if batch.stop_reason is None and following is not None:
            _send_chunk(session, following)
        else:
            send_settle(session, batch_id)
    log.info("batch %s chunk %d: %d lines in %.2fs (answering %.2fs)", batch_id, seq, len(results),
             time.perf_counter() - started, answered)


# --------------------------------------------------------------------------------------------------------
# Finalising
# --------------------------------------------------------------------------------------------------------


def _merged_errors(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """Error lines of validation and of every chunk (each file in input order), merged in input order."""
    streams = [_read_jsonl(p) for p in paths if p.exists()]
    for record in heapq.merge(*streams, key=lambda r: int(r["line"])):
        yield {k: v for k, v in record.items() if k != "line"}


def _store_output(tenant_id: str, batch_id: str, kind: str, blocks: Iterable[bytes]) -> File | None:
    """Write a result file where uploads live, as a ``batch_output`` File row; None when it has no lines."""
    import hashlib

    file_id = ids.new_id(ids.FILE)
    dest = file_path(tenant_id, file_id)
    size = _write_blocks(dest, blocks)
    if size == 0:
        dest.unlink(missing_ok=True)
        return None
    digest = hashlib.sha256()
    with dest.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    location = storage.publish(dest, storage.file_key(tenant_id, file_id))
    return File(id=file_id, tenant_id=tenant_id, filename=f"{batch_id}_{kind}.jsonl", purpose="batch_output",
                bytes=size, sha256=digest.hexdigest(), path=location)


def settle(batch_id: str) -> str | None:
    """Finalise the batch if its work is over (all chunks done, or a stop asked for and nothing running).

    Returns the final status it recorded, or None when there was nothing to do yet.
    """
    settings = get_settings()
    started = time.perf_counter()
    with transaction() as session:
        batch = batches_repo.get_batch_by_id(session, batch_id, lock=True)
        if batch is None or batch.status in batches.TERMINAL:
            return None
        if batch.status == batches.VALIDATING and batch.stop_reason is None:
            return None
        chunks = batches_repo.chunks(session, batch_id)
        fresh = batch.heartbeat_at is not None and \
            batch.heartbeat_at > utcnow() - timedelta(seconds=settings.stale_heartbeat_seconds)
        if any(c.status == "running" for c in chunks) and fresh:
            return None  # the worker running it settles when it stops
        if batch.stop_reason is None and any(c.status != "done" for c in chunks):
            return None
        target = STOP_TARGETS.get(batch.stop_reason or "", batches.COMPLETED)
        if target == batches.COMPLETED and batch.status == batches.IN_PROGRESS:
            batches.transition(session, batch, batches.FINALIZING)
        batch.heartbeat_at = utcnow()
        tenant_id = batch.tenant_id
        done = [c for c in chunks if c.status == "done"]
        outputs = [c.output_path for c in done if c.output_path]
        error_paths = [storage.location(f"{work_key(batch_id)}/{PLAN_DIR}/{VALIDATION_ERRORS}")] + \
            [c.error_path for c in done if c.error_path]
    # Downloaded (with object storage) after the row lock is released.
    outputs_here = [p for p in map(_local_copy, outputs) if p is not None]
    errors_here = [p for p in map(_local_copy, error_paths) if p is not None]
    output_file = _store_output(tenant_id, batch_id, "output", _file_blocks(outputs_here))
    error_file = _store_output(tenant_id, batch_id, "error", _encoded(_merged_errors(errors_here)))
    with transaction() as session:
        batch = batches_repo.get_batch_by_id(session, batch_id, lock=True)
        if batch is None or batch.status in batches.TERMINAL:
            for stored in (output_file, error_file):
                if stored is not None:
                    storage.delete(stored.path)
            return None
        for stored in (output_file, error_file):
            if stored is not None:
                session.add(stored)
        batch.output_file_id = output_file.id if output_file else None
        batch.error_file_id = error_file.id if error_file else None
        batches.transition(session, batch, target)
    shutil.rmtree(work_dir(batch_id), ignore_errors=True)
    if storage.remote():
        for location in [*outputs, *error_paths]:
            storage.delete(location)  # each also leaves this machine's cache
        storage.delete_key(work_key(batch_id))
    log.info("batch %s %s; result files written in %.2fs", batch_id, target, time.perf_counter() - started)
    return target


@celery_app.task(name=batches.TASK_SETTLE)
def settle_batch(batch_id: str) -> None:
    """Task form of :func:`settle`."""
    settle(batch_id)
