"""Benchmark: a fine-tuning job's life end to end, and the API's latency under concurrent load.

Two measurements, taken on this machine with real processes (the API and Celery workers as `llmos up`
runs them) and printed as a small table plus one JSON line at the end:

1. Lifecycle: N `tiny-bert` classification jobs, one after another, through the HTTP API; the time from
   the create call returning to the job reading `running`, and to it reading `succeeded`.
2. API latency at a given concurrency: job creation (POST) and retrieval (GET), each against a bare
   FastAPI app served the same way, so the figures read as "how much our app costs over FastAPI"; and
   against that bare app plus the one database round trip each call needs (a SELECT of the job's row, an
   INSERT committed durably) on asyncpg directly, the floor under any design that keeps jobs in Postgres.

Usage:
    python bench/lifecycle.py [--jobs 5] [--requests 2000] [--concurrency 32]

With LLMOS_DATABASE_URL / LLMOS_BROKER_URL set it uses those servers (a fresh database, dropped at the
end; the broker's job queues purged); otherwise it starts embedded Postgres and Redis in a temp dir.
`--serve-bare PORT` is internal: it runs the bare baseline app in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import io
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
QUEUES = ("gpu", "cpu", "inference", "webhooks")
# Polling the job every 20 ms: each lifecycle figure is late by at most this plus one GET's latency.
POLL_INTERVAL = 0.02
HEALTH_TIMEOUT = 90.0
WORKERS_TIMEOUT = 120.0
JOB_TIMEOUT = 600.0
TRAIN_ROWS = 120
HYPERPARAMETERS: dict[str, Any] = {"n_epochs": 3, "batch_size": 8, "learning_rate": 3e-3}
# Statuses a job reads once it got past queued / started running. A job that skips through a status
# faster than one poll counts as having reached it at the first later status seen.
QUEUED_OR_LATER = {"queued", "running", "succeeded"}
RUNNING_OR_LATER = {"running", "succeeded"}
# Nobody cancels or pauses a bench job: any of these means the run is broken, not slow.
WILL_NOT_SUCCEED = {"failed", "cancelled", "cancelling", "paused"}


# --------------------------------------------------------------------------------------------------------
# The bare baseline app
# --------------------------------------------------------------------------------------------------------


class BareJob(BaseModel):
    """The same shape of body the create-job call gets, parsed the same way (pydantic)."""

    model: str
    training_file: str
    hyperparameters: dict[str, Any] | None = None


def create_bare_app() -> Any:
    from fastapi import FastAPI

    # Configured as our app is (api/app.py): no native OpenTelemetry hooks.
    app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})

    # `async def` handlers, as the project's are, so the ratio measures what our handlers do (auth,
    # database, broker), not a sync-versus-async dispatch difference.
    @app.post("/v1/fine_tuning/jobs")
    async def create(body: BareJob) -> dict[str, Any]:
        return {"id": f"ftjob-{secrets.token_hex(12)}", "object": "fine_tuning.job", "model": body.model,
                "training_file": body.training_file, "status": "validating_files"}

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve(job_id: str) -> dict[str, Any]:
        return {"id": job_id, "object": "fine_tuning.job", "model": "tiny-bert", "status": "queued"}

    add_database_floor(app)
    return app


def add_database_floor(app: Any) -> None:
    """The same two routes plus the one database round trip each cannot do without, on asyncpg directly.

    This is the floor under any design that keeps jobs in Postgres: a GET that reads the job's row, a POST
    that inserts a row and commits it durably. No authentication, no service, no ORM; a pool as large as
    one API process has.
    """
    import asyncpg
    from fastapi import HTTPException
    from sqlalchemy.engine import make_url

    dsn = make_url(os.environ["LLMOS_DATABASE_URL"]).set(drivername="postgresql").render_as_string(
        hide_password=False)
    pools: list[Any] = []

    @app.on_event("startup")
    async def open_pool() -> None:
        pools.append(await asyncpg.create_pool(dsn, min_size=10, max_size=10))
        with contextlib.suppress(asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
            await pools[0].execute("CREATE TABLE IF NOT EXISTS bench_floor_jobs (id text PRIMARY KEY, body jsonb)")

    @app.post("/floor/v1/fine_tuning/jobs")
    async def create(body: BareJob) -> dict[str, Any]:
        job_id = f"ftjob-{secrets.token_hex(12)}"
        await pools[0].execute("INSERT INTO bench_floor_jobs (id, body) VALUES ($1, $2)", job_id,
                               body.model_dump_json())
        return {"id": job_id, "object": "fine_tuning.job", "model": body.model,
                "training_file": body.training_file, "status": "validating_files"}

    @app.get("/floor/v1/fine_tuning/jobs/{job_id}")
    async def retrieve(job_id: str) -> dict[str, Any]:
        row = await pools[0].fetchrow(
            "SELECT id, model, status, created_at, hyperparameters FROM fine_tuning_jobs WHERE id = $1", job_id)
        if row is None:
            raise HTTPException(404)
        return {"id": row["id"], "object": "fine_tuning.job", "model": row["model"], "status": row["status"],
                "created_at": int(row["created_at"].timestamp())}


def serve_bare(port: int) -> None:
    import uvicorn

    from ops.cli import api_workers

    # The worker processes import this module by name: the repository root must be on their path.
    sys.path.insert(0, str(ROOT))
    # Served exactly as `llmos api` serves ours (ops/cli.py cmd_api): as many processes, the same loop and
    # HTTP parser, log level and shutdown.
    uvicorn.run("bench.lifecycle:create_bare_app", factory=True, host="127.0.0.1", port=port,
                workers=api_workers(None), loop="uvloop", http="httptools", log_level="warning",
                timeout_graceful_shutdown=10)


# --------------------------------------------------------------------------------------------------------
# Processes and services
# --------------------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """A child process in its own session (so its whole tree can be signalled), output kept in a log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        from ops.supervisor import parent_death_preexec

        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        # Parent-death signal: should the bench be SIGKILLed, its children do not live on as orphans.
        self.popen = subprocess.Popen(argv, env={**os.environ, **env}, cwd=ROOT, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=parent_death_preexec(signal.SIGTERM))

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        # Celery's pool children share the group; make sure none outlives a worker that exited first.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_http(url: str, child: Child, timeout: float = HEALTH_TIMEOUT) -> None:
    def up() -> bool:
        if child.popen.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.popen.returncode}:\n{child.tail()}")
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout, f"{child.name} to answer {url}")


def redact(url: str) -> str:
    """A URL fit to print: any password replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def create_database(server_url: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"llmos_bench_{secrets.token_hex(4)}"
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(db_url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    admin.dispose()


def purge_queues(broker_url: str) -> None:
    import redis

    if broker_url.startswith("redis"):
        conn = redis.Redis.from_url(broker_url)
        conn.delete(*QUEUES)
        conn.close()


def workers_ready() -> bool:
    """Every queue has a worker answering a broadcast ping (so job 1 does not time worker start-up)."""
    from infra.broker import producer

    replies = producer().control.ping(timeout=1.0) or []
    names = {name for reply in replies for name in reply}
    return all(any(name.startswith(f"{queue}-") for name in names) for queue in QUEUES)


@dataclass
class Stack:
    """The processes the bench started and the LLMOS_* environment they share."""

    env: dict[str, str]
    log_dir: Path
    mode: str
    children: dict[str, Child]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.env['LLMOS_API_PORT']}"

    def start(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv, self.env, self.log_dir)
        self.children[name] = child
        return child

    def stop(self, *names: str) -> None:
        for name in names:
            child = self.children.pop(name, None)
            if child is not None:
                child.stop()

    def stop_all(self) -> None:
        # Reverse start order: the API, which the others were started after, goes last.
        self.stop(*reversed(self.children))


def bring_up(exits: contextlib.ExitStack, work: Path, failure_logs: list[Child]) -> Stack:
    """Servers, a fresh database, migrations, base models, then the API and one worker per queue."""
    database_server = os.environ.get("LLMOS_DATABASE_URL")
    broker_url = os.environ.get("LLMOS_BROKER_URL")
    kinds = ["external" if database_server else "embedded", "external" if broker_url else "embedded"]
    from ops.stack import start_servers

    servers = start_servers(work, database_server, broker_url, log_dir=work / "logs")
    exits.callback(servers.stop)
    database_server, broker_url = servers.database_url, servers.broker_url
    database_url = create_database(database_server)
    mode = f"database {redact(database_url)} ({kinds[0]}), broker {redact(broker_url)} ({kinds[1]})"
    exits.callback(drop_database, database_url)
    # A shared broker may hold messages of an earlier run; ours must be the only work the workers see.
    purge_queues(broker_url)
    exits.callback(purge_queues, broker_url)

    home = work / "home"
    env = {
        "LLMOS_HOME": str(home),
        "LLMOS_DATABASE_URL": database_url,
        "LLMOS_BROKER_URL": broker_url,
        "LLMOS_API_PORT": str(free_port()),
    }
    # The bench's own imports (bootstrap, the Celery producer) read the same settings as the children.
    os.environ.update(env)
    from core.settings import get_settings

    get_settings.cache_clear()
    from db.session import get_engine
    from ops.bootstrap import migrate, register_base_models

    migrate()
    exits.callback(lambda: get_engine().dispose())
    # Building the offline base models draws tqdm bars on stderr that would only clutter the figures;
    # they are shown only if the build fails. (Logging keeps its own handle on the real stderr.)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            register_base_models(home / "models")
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise

    stack = Stack(env, work / "logs", mode, {})
    exits.callback(stack.stop_all)
    from ops.stack import argv

    api = stack.start("api", argv("api"))
    for queue in QUEUES:
        stack.start(f"worker-{queue}", argv(f"worker-{queue}"))
    failure_logs.extend(stack.children.values())
    wait_http(f"{stack.api_url}/healthz", api)
    wait_until(workers_ready, WORKERS_TIMEOUT, "a worker on each of the gpu, cpu and inference queues", 0.5)
    return stack


# --------------------------------------------------------------------------------------------------------
# Phase 1: the lifecycle of jobs
# --------------------------------------------------------------------------------------------------------


@dataclass
class JobTiming:
    job_id: str
    to_queued: float
    to_running: float
    to_succeeded: float
    accuracy: float | None


def pool_processes(worker: Child) -> set[int]:
    """PIDs of a Celery worker's pool processes."""
    import psutil

    return {child.pid for child in psutil.Process(worker.popen.pid).children()}


def wait_idle(worker: Child, busy: set[int]) -> set[int]:
    """Wait until the training worker has a pool process that has run nothing yet (the ones in `busy` ran
    a job and exit after it, `--max-tasks-per-child=1`): the "idle worker" a submission should find."""
    fresh: set[int] = wait_until(lambda: (pool_processes(worker) - busy) or None, WORKERS_TIMEOUT,
                                 "the training worker to start a fresh pool process")
    return fresh


def run_job(http: httpx.Client, file_id: str) -> JobTiming:
    response = http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "hyperparameters": HYPERPARAMETERS})
    submitted = time.perf_counter()
    if response.status_code != 200:
        raise RuntimeError(f"job creation answered {response.status_code}: {response.text}")
    job_id = response.json()["id"]
    to_queued: float | None = None
    to_running: float | None = None
    deadline = submitted + JOB_TIMEOUT
    while time.perf_counter() < deadline:
        polled = http.get(f"/v1/fine_tuning/jobs/{job_id}")
        polled.raise_for_status()
        job = polled.json()
        seen = time.perf_counter() - submitted
        if to_queued is None and job["status"] in QUEUED_OR_LATER:
            to_queued = seen
        if to_running is None and job["status"] in RUNNING_OR_LATER:
            to_running = seen
        if job["status"] == "succeeded":
            assert to_queued is not None and to_running is not None
            accuracy = (job.get("metrics") or {}).get("accuracy")
            return JobTiming(job_id, to_queued, to_running, seen, accuracy)
        if job["status"] in WILL_NOT_SUCCEED:
            raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
        time.sleep(POLL_INTERVAL)
    raise RuntimeError(f"job {job_id} did not succeed within {JOB_TIMEOUT:.0f}s")


def upload_training_file(http: httpx.Client) -> str:
    from tests.data import jsonl, sentiment_rows

    rows: list[dict[str, object]] = [dict(row) for row in sentiment_rows(TRAIN_ROWS)]
    content = jsonl(rows).encode()
    response = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", content)})
    if response.status_code != 200:
        raise RuntimeError(f"upload answered {response.status_code}: {response.text}")
    file_id: str = response.json()["id"]
    return file_id


# --------------------------------------------------------------------------------------------------------
# Phase 2: API latency under concurrent load
# --------------------------------------------------------------------------------------------------------


@dataclass
class Load:
    latencies: list[float]
    wall: float
    ids: list[str]

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]  # nearest rank

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall


class Connection:
    """One kept-alive HTTP/1.1 connection speaking just enough of the protocol for these two calls.

    Why not httpx.AsyncClient: on this 2-core machine its connection pool tops out near 160 req/s at
    32 connections (about 470 req/s at one), far below what either server can answer, so it measured
    itself. This client costs the load generator a small fraction of a server's work per request, and
    both servers get the very same bytes.
    """

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body is not None else ""
        writer.write(f"{method} {path} HTTP/1.1\r\n{self.headers}{extra}\r\n".encode() + (body or b""))
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(":", 1) for line in header_lines if ":" in line)
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        if "content-length" not in fields:
            raise RuntimeError(f"{method} {path}: response without Content-Length ({status_line})")
        content = await reader.readexactly(int(fields["content-length"]))
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return int(status_line.split(" ", 2)[1]), content

    async def close(self) -> None:
        if self.streams is not None:
            writer = self.streams[1]
            self.streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _load(base: str, headers: dict[str, str], method: str, paths: Callable[[int], str],
                body: dict[str, Any] | None, requests: int, warmup: int, concurrency: int) -> Load:
    """``requests`` calls by ``concurrency`` clients, one kept-alive connection each, after ``warmup`` calls.

    The warm-up runs on the same connections, so measured calls pay no TCP connects or first-use imports;
    the responses are parsed in both apps' runs alike (the POST ids feed the GET run).
    """
    url = httpx.URL(base)
    assert url.port is not None
    connections = [Connection(url.host, url.port, headers) for _ in range(concurrency)]
    payload = json.dumps(body).encode() if body is not None else None

    async def run(total: int) -> Load:
        latencies: list[float] = []
        ids: list[str] = []
        issued = 0  # shared by the clients; asyncio switches only at await, so no lock is needed

        async def one_client(connection: Connection) -> None:
            nonlocal issued
            while issued < total:
                path = paths(issued)
                issued += 1
                started = time.perf_counter()
                status, content = await connection.request(method, path, payload)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"{method} {path} answered {status}: {content[:500]!r}")
                ids.append(json.loads(content)["id"])

        started = time.perf_counter()
        await asyncio.gather(*(one_client(connection) for connection in connections))
        return Load(latencies, time.perf_counter() - started, ids)

    try:
        await run(warmup)
        return await run(requests)
    finally:
        for connection in connections:
            await connection.close()


def measure(base: str, headers: dict[str, str], method: str, paths: Callable[[int], str],
            body: dict[str, Any] | None, requests: int, concurrency: int) -> Load:
    warmup = min(200, max(requests // 10, concurrency))
    # uvloop when present (uvicorn[standard] brings it): a cheaper loop leaves more CPU to the servers.
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_load(base, headers, method, paths, body, requests, warmup, concurrency))


# --------------------------------------------------------------------------------------------------------
# Phase 3: requests that wait, and what they cost everyone else
# --------------------------------------------------------------------------------------------------------

WAITERS = 150
WAIT_SECONDS = 100
PROBES = 300


async def _probe(base: str, headers: dict[str, str], paths: list[str], count: int) -> dict[str, Load]:
    """``count`` sequential GETs of each path on one kept-alive connection: the latency a lone poller sees."""
    url = httpx.URL(base)
    assert url.port is not None
    out = {}
    for path in paths:
        connection = Connection(url.host, url.port, headers)
        latencies = []
        started = time.perf_counter()
        try:
            for _ in range(count):
                begun = time.perf_counter()
                status, content = await connection.request("GET", path, None)
                latencies.append(time.perf_counter() - begun)
                if status != 200:
                    raise RuntimeError(f"GET {path} answered {status}: {content[:300]!r}")
        finally:
            await connection.close()
        out[path] = Load(latencies, time.perf_counter() - started, [])
    return out


async def _while_waiting(base: str, headers: dict[str, str], paths: list[str], waiters: int) -> tuple[
        dict[str, Load], dict[str, Load]]:
    """Probe latencies idle, then again while ``waiters`` inference calls wait for an answer that cannot come
    (no inference worker runs), each on its own connection with ``Prefer: wait``."""
    idle = await _probe(base, headers, paths, PROBES)
    url = httpx.URL(base)
    assert url.port is not None
    body = json.dumps({"model": "tiny-gpt2", "prompt": "hello", "max_tokens": 4}).encode()
    waiting_headers = {**headers, "Prefer": f"wait={WAIT_SECONDS}"}
    connections = [Connection(url.host, url.port, waiting_headers) for _ in range(waiters)]
    calls = [asyncio.create_task(c.request("POST", "/v1/completions", body)) for c in connections]
    try:
        # The waiters are in once the API has inserted their rows; then they only wait.
        await asyncio.sleep(0)
        deadline = time.perf_counter() + 30
        while sum(not c.done() for c in calls) < waiters and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        done_early = [c for c in calls if c.done()]
        if done_early:
            raise RuntimeError(f"{len(done_early)} waiting calls ended early: {done_early[0].result()!r}")
        loaded = await _probe(base, headers, paths, PROBES)
        if any(c.done() for c in calls):
            raise RuntimeError("a waiting call ended while the probes ran")
        return idle, loaded
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        for connection in connections:
            await connection.close()


def while_waiting(base: str, headers: dict[str, str], paths: list[str], waiters: int) -> tuple[
        dict[str, Load], dict[str, Load]]:
    with asyncio.Runner() as runner:
        return runner.run(_while_waiting(base, headers, paths, waiters))


def api_rss_mb(api: Child) -> list[float]:
    """Resident memory of each process serving the API (uvicorn's workers, or the one process), MB."""
    import psutil

    root = psutil.Process(api.popen.pid)
    # uvicorn's workers are spawned processes; multiprocessing's resource tracker is not one of them.
    workers = [p for p in root.children(recursive=True)
               if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
    return [round(p.memory_info().rss / 2**20, 1) for p in (workers or [root])]


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------


def cpu_idle_share(seconds: float = 1.0) -> float | None:
    """Share of all CPUs left idle over ``seconds`` (/proc/stat), None where that cannot be read.

    Sampled before the bench starts anything and after it stopped everything: a low figure means
    someone else (a test run, say) was using the machine and the timings are noisy. The load average
    cannot say this, as the API's threads queued on the GIL under load count as runnable.
    """

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle_before, total_before = sample()
        time.sleep(seconds)
        idle_after, total_after = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round((idle_after - idle_before) / max(1, total_after - total_before), 3)


def machine_facts() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "torch": torch_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_idle_before": cpu_idle_share(),
    }


def percent(share: float | None) -> str:
    return "unknown" if share is None else f"{share * 100:.0f}%"


def load_row(label: str, load: Load, bare: Load | None) -> list[str]:
    p50, p99 = load.percentile(50), load.percentile(99)
    ratios = ["", ""]
    if bare is not None:
        ratios = [f"{p50 / bare.percentile(50):.1f}x", f"{load.rps / bare.rps:.2f}x"]
    return [label, f"{p50 * 1000:.2f}", f"{p99 * 1000:.2f}", f"{load.rps:.0f}", *ratios]


def load_json(load: Load, bare: Load | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "p50_ms": round(load.percentile(50) * 1000, 3),
        "p99_ms": round(load.percentile(99) * 1000, 3),
        "rps": round(load.rps, 1),
    }
    if bare is not None:
        out["p50_ratio_to_bare"] = round(load.percentile(50) / bare.percentile(50), 2)
        out["rps_ratio_to_bare"] = round(load.rps / bare.rps, 3)
    return out


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    # First column (labels) left-aligned, figures right-aligned.
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows)


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=5, help="tiny-bert jobs run one after another (5)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per endpoint under load (2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients under load (32)")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("jobs", "requests", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def run(args: argparse.Namespace, work: Path) -> None:
    facts = machine_facts()
    command = shlex.join(["python", *sys.argv])
    print(f"command: {command}")
    print(f"machine: {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable) {facts['cpu_model']}; "
          f"torch {facts['torch']}; Python {facts['python']}; {facts['platform']}")
    print(f"CPU idle before start: {percent(facts['cpu_idle_before'])}")

    failure_logs: list[Child] = []
    with contextlib.ExitStack() as exits:
        try:
            started = time.perf_counter()
            stack = bring_up(exits, work, failure_logs)
            print(f"services: {stack.mode}; stack up in {time.perf_counter() - started:.1f}s")
            from ops.bootstrap import create_key

            headers = {"Authorization": f"Bearer {create_key('bench', ['files', 'fine_tuning', 'inference'])[1]}"}
            from db.session import transaction
            from domain.tenants import set_limits

            # A rate limit too high to reach rather than none (0), so each request still pays the limiter's
            # round trip as in a deployment with the default limits; no job quota, since the load creates
            # thousands of jobs (with one, a creation also locks the tenant and counts up to quota + 1 jobs).
            with transaction() as session:
                set_limits(session, name="bench", rpm=10**9, max_active_jobs=0)
            rss_at_rest = api_rss_mb(stack.children["api"])

            # Phase 1: jobs one after another, so each has the workers to itself.
            with httpx.Client(base_url=stack.api_url, headers=headers, timeout=60) as http:
                file_id = upload_training_file(http)
                timings = []
                busy: set[int] = set()
                for _ in range(args.jobs):
                    busy |= wait_idle(stack.children["worker-gpu"], busy)
                    timings.append(run_job(http, file_id))

            # Phase 2: the API alone. Workers stopped so the backlog of created jobs takes no CPU.
            stack.stop(*[f"worker-{queue}" for queue in QUEUES])
            bare_port = free_port()
            bare = stack.start("bare", [sys.executable, str(Path(__file__).resolve()), "--serve-bare",
                                        str(bare_port)])
            failure_logs.append(bare)
            bare_url = f"http://127.0.0.1:{bare_port}"
            wait_http(f"{bare_url}/v1/fine_tuning/jobs/ping", bare)

            body = {"model": "tiny-bert", "training_file": file_id, "hyperparameters": HYPERPARAMETERS}
            n, c = args.requests, args.concurrency

            def create_path(_: int) -> str:
                return "/v1/fine_tuning/jobs"

            # Each pair back to back, bare first, so drift in the machine's load hits both sides alike.
            def floor_path(i: int) -> str:
                return f"/floor{create_path(i)}"

            bare_post = measure(bare_url, headers, "POST", create_path, body, n, c)
            floor_post = measure(bare_url, headers, "POST", floor_path, body, n, c)
            ours_post = measure(stack.api_url, headers, "POST", create_path, body, n, c)
            job_ids = ours_post.ids

            def get_path(i: int) -> str:
                return f"/v1/fine_tuning/jobs/{job_ids[i % len(job_ids)]}"

            def floor_get_path(i: int) -> str:
                return f"/floor{get_path(i)}"

            bare_get = measure(bare_url, headers, "GET", get_path, None, n, c)
            floor_get = measure(bare_url, headers, "GET", floor_get_path, None, n, c)
            ours_get = measure(stack.api_url, headers, "GET", get_path, None, n, c)

            # Phase 3: callers waiting on inference (none answers: the workers are stopped) beside pollers.
            probe_paths = [get_path(0), "/healthz"]
            idle, loaded = while_waiting(stack.api_url, headers, probe_paths, WAITERS)
        except Exception:  # a failure, not an interrupt: show what the processes said before they go
            for child in failure_logs:
                print(f"--- last lines of {child.name} ({child.log_path}) ---\n{child.tail()}", file=sys.stderr)
            raise

    to_queued = [t.to_queued for t in timings]
    to_running = [t.to_running for t in timings]
    to_succeeded = [t.to_succeeded for t in timings]
    facts["cpu_idle_after"] = cpu_idle_share()

    print()
    print(f"Lifecycle: {args.jobs} tiny-bert classification jobs in sequence, each to an idle worker "
          f"({TRAIN_ROWS} rows, "
          f"{json.dumps(HYPERPARAMETERS)}), polled every {POLL_INTERVAL * 1000:.0f} ms")
    print(table([
        ["", "median s", "max s", "each job s"],
        ["submit -> queued (validated)", f"{statistics.median(to_queued):.2f}", f"{max(to_queued):.2f}",
         " ".join(f"{x:.2f}" for x in to_queued)],
        ["submit -> running", f"{statistics.median(to_running):.2f}", f"{max(to_running):.2f}",
         " ".join(f"{x:.2f}" for x in to_running)],
        ["submit -> succeeded", f"{statistics.median(to_succeeded):.2f}", f"{max(to_succeeded):.2f}",
         " ".join(f"{x:.2f}" for x in to_succeeded)],
    ]))
    # Not a timing, a sanity check that the jobs really trained (eval on the held-out share of rows).
    print(f"eval accuracy per job: {' '.join(f'{t.accuracy:.2f}' if t.accuracy is not None else '-' for t in timings)}")
    print()
    print(f"API at concurrency {args.concurrency}: {args.requests} requests per endpoint, no workers running")
    print(table([
        ["endpoint", "p50 ms", "p99 ms", "req/s", "p50 vs bare", "req/s vs bare"],
        load_row("POST /v1/fine_tuning/jobs", ours_post, bare_post),
        load_row("  bare + one durable INSERT", floor_post, bare_post),
        load_row("  bare FastAPI POST", bare_post, None),
        load_row("GET /v1/fine_tuning/jobs/{id}", ours_get, bare_get),
        load_row("  bare + one SELECT", floor_get, bare_get),
        load_row("  bare FastAPI GET", bare_get, None),
    ]))
    print(f"ours vs the database floor: POST {ours_post.rps / floor_post.rps:.2f}x, "
          f"GET {ours_get.rps / floor_get.rps:.2f}x (req/s)")
    print()
    print(f"p99 of a lone poller while {WAITERS} inference calls wait with `Prefer: wait={WAIT_SECONDS}` "
          f"({PROBES} sequential GETs each)")
    print(table([
        ["endpoint", "idle p99 ms", "waiting p99 ms", "ratio"],
        *[[("GET /v1/fine_tuning/jobs/{id}" if path != "/healthz" else path),
           f"{idle[path].percentile(99) * 1000:.2f}", f"{loaded[path].percentile(99) * 1000:.2f}",
           f"{loaded[path].percentile(99) / idle[path].percentile(99):.1f}x"] for path in probe_paths],
    ]))
    print(f"API RSS at rest: {', '.join(f'{mb:.0f} MB' for mb in rss_at_rest)} "
          f"({len(rss_at_rest)} process{'es' if len(rss_at_rest) > 1 else ''})")
    print(f"CPU idle after stop: {percent(facts['cpu_idle_after'])} (either well below 100%: another "
          "workload shared the machine, so rerun)")
    print(json.dumps({
        "command": command,
        "machine": facts,
        "services": stack.mode,
        "lifecycle": {
            "jobs": args.jobs, "rows": TRAIN_ROWS, "hyperparameters": HYPERPARAMETERS,
            "poll_interval_s": POLL_INTERVAL,
            "submit_to_queued_s": {"median": round(statistics.median(to_queued), 3),
                                   "max": round(max(to_queued), 3),
                                   "each": [round(x, 3) for x in to_queued]},
            "submit_to_running_s": {"median": round(statistics.median(to_running), 3),
                                    "max": round(max(to_running), 3),
                                    "each": [round(x, 3) for x in to_running]},
            "submit_to_succeeded_s": {"median": round(statistics.median(to_succeeded), 3),
                                      "max": round(max(to_succeeded), 3),
                                      "each": [round(x, 3) for x in to_succeeded]},
            "accuracy": [t.accuracy for t in timings],
        },
        "api": {
            "concurrency": args.concurrency, "requests": args.requests,
            "post_jobs": load_json(ours_post, bare_post), "bare_post": load_json(bare_post, None),
            "get_job": load_json(ours_get, bare_get), "bare_get": load_json(bare_get, None),
            "floor_post": load_json(floor_post, bare_post), "floor_get": load_json(floor_get, bare_get),
        },
        "waiting": {
            "waiters": WAITERS,
            "probes": {("get_job" if path != "/healthz" else "healthz"): {
                "idle_p99_ms": round(idle[path].percentile(99) * 1000, 3),
                "waiting_p99_ms": round(loaded[path].percentile(99) * 1000, 3)} for path in probe_paths},
        },
        "api_rss_mb": rss_at_rest,
    }))


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    # Under the system temp dir (/tmp), never a pytest dir: embedded Postgres runs as its own user when
    # root, and must be able to reach its data directory.
    work = Path(tempfile.mkdtemp(prefix="llmos-bench-"))
    (work / "logs").mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return
    # Run as a script, sys.path starts at bench/; the project and tests.data live at the repository root.
    sys.path.insert(0, str(ROOT))
    # SIGTERM (a CI timeout, `kill`) must unwind the finally blocks that stop servers and processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with scratch_dir() as work:
        run(args, work)


if __name__ == "__main__":
    main()
