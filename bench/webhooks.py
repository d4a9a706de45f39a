"""Benchmark: webhook delivery throughput and latency, from the outbox to a real receiver on 127.0.0.1.

Real processes as `llmos up` runs them (the API, a `webhooks` worker at its default concurrency, and beat), real
Postgres and Redis, and an HTTP receiver in this process. Printed as tables plus one JSON line at the end:

1. Throughput: one webhook endpoint (events ["*"]) registered through the HTTP API, then 1,000 outbox events
   created in one transaction with `domain.events.emit_event` (the real fan-out path: one delivery row and one
   staged flush task per destination). Timed from the commit until the receiver holds every (endpoint,
   webhook-id) pair; deliveries/s = deliveries / elapsed. Then the same with 4 endpoints (4 destinations,
   4,000 deliveries), which the worker may send in parallel.
2. Latency: events emitted one at a time, each in its own transaction, spaced apart (50 ms, then 30 ms) so
   they need not queue behind each other; for each, the time from just before its commit to its first
   arrival; p50 / p99, and the p50 of each quarter of the run, which rises when the sender cannot keep up.
3. Every request received is verified on receipt with the `standardwebhooks` package against the secret
   that the endpoint's creation response returned (and its payload id checked against the webhook-id).

Alongside the figures it prints what explains them: the CPU each process used during a phase, the sender's
own view of the HTTP round trip (`duration_ms` of the delivery attempts), and the flush tasks the worker ran
(from its log). With --profile it samples the worker's pool processes with py-spy and breaks the time per
delivery down by stage of tasks/webhooks.py and by what was being waited on (SQL, COMMIT, HTTP socket, ...).

Usage:
    python bench/webhooks.py [--events 1000] [--fanout 4] [--latency-events 200] [--spacing-ms 50 30]
                             [--profile [--py-spy PATH]] [--keep DIR]

With LLMOS_DATABASE_URL / LLMOS_BROKER_URL set it uses those servers (a fresh database, dropped at the end;
the broker's job queues purged); otherwise it starts embedded Postgres and Redis in a temp dir. Settings are
the defaults of a real install except LLMOS_WEBHOOK_ALLOW_PRIVATE=1, as the receiver is on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import psutil

if __package__ in (None, ""):
    # Run as a script, sys.path starts at bench/; the project and bench.lifecycle live at the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lifecycle import (
    Child,
    create_database,
    drop_database,
    free_port,
    purge_queues,
    redact,
    scratch_dir,
    table,
    wait_http,
    wait_until,
)

WORKERS_TIMEOUT = 120.0
EVENT_TYPE = "model.created"
# A worker log line of Celery's: "Task llmos.webhooks.flush[<id>] succeeded in 0.0123s: 7".
FLUSH_DONE = re.compile(r"Task llmos\.webhooks\.flush\[[^\]]+\] succeeded in ([0-9.e-]+)s: (\d+)")


# --------------------------------------------------------------------------------------------------------
# The receiver
# --------------------------------------------------------------------------------------------------------


@dataclass
class Arrival:
    path: str
    webhook_id: str
    at: float  # time.perf_counter() when the body had been read
    headers: dict[str, str]
    body: bytes
    error: str | None = None  # why the signature did not verify; None when it did


def check_signature(secret: str, arrival: Arrival) -> str | None:
    """Verify as a receiver would, with the standardwebhooks package; the reason it failed, or None."""
    import standardwebhooks

    try:
        payload = standardwebhooks.Webhook(secret).verify(arrival.body, arrival.headers)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if payload.get("id") != arrival.webhook_id:
        return f"payload id {payload.get('id')} is not the webhook-id {arrival.webhook_id}"
    return None


@dataclass
class Receiver:
    """Every POST is answered 200 at once and recorded with its arrival time; paths tell endpoints apart."""

    url: str = ""
    secrets: dict[str, str] = field(default_factory=dict)  # path -> the endpoint's signing secret
    arrivals: list[Arrival] = field(default_factory=list)
    # First arrival of each (path, webhook-id); a redelivery keeps the first.
    first: dict[tuple[str, str], float] = field(default_factory=dict)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def record(self, arrival: Arrival) -> None:
        with self.changed:
            self.arrivals.append(arrival)
            self.first.setdefault((arrival.path, arrival.webhook_id), arrival.at)
            self.changed.notify_all()

    def wait_for(self, expected: set[tuple[str, str]], timeout: float) -> float:
        """Block until every expected (path, webhook-id) arrived; return the latest first-arrival time."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                missing = expected.difference(self.first)
                if not missing:
                    return max(self.first[key] for key in expected)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"timed out after {timeout:.0f}s: {len(expected) - len(missing)} of "
                                       f"{len(expected)} deliveries arrived")
                self.changed.wait(min(left, 1.0))

    def since(self, start: int) -> list[Arrival]:
        with self.changed:
            return self.arrivals[start:]


@contextlib.contextmanager
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        # Keep-alive with TCP_NODELAY, as production receivers (nginx, uvicorn, load balancers) run: the
        # sender's pooled httpx client reuses its connection, and we measure the sender, not handshakes.
        # Without TCP_NODELAY a kept-alive http.server answers in two segments and Nagle's algorithm meets
        # the client's delayed ACK: ~40 ms per request on loopback, a receiver artefact, not the sender's.
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            at = time.perf_counter()
            headers = {k.lower(): v for k, v in self.headers.items()}
            arrival = Arrival(self.path, headers.get("webhook-id", ""), at, headers, body)
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
            # Verified on receipt (the timestamp must be fresh), after answering so the sender does not wait.
            secret = state.secrets.get(self.path)
            arrival.error = check_signature(secret, arrival) if secret else f"no endpoint registered at {self.path}"
            state.record(arrival)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="receiver", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------------------
# Services and processes (the approach of bench/lifecycle.py: fresh database, own-session children)
# --------------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    env: dict[str, str]
    log_dir: Path
    mode: str
    broker_url: str
    children: dict[str, Child]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.env['LLMOS_API_PORT']}"

    def start(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv, self.env, self.log_dir)
        self.children[name] = child
        return child

    def stop_all(self) -> None:
        for name in reversed(list(self.children)):
            self.children.pop(name).stop()


def webhooks_worker_ready() -> bool:
    from infra.broker import producer

    replies = producer().control.ping(timeout=1.0) or []
    return any(name.startswith("webhooks-") for reply in replies for name in reply)


def bring_up(exits: contextlib.ExitStack, work: Path, failure_logs: list[Child]) -> Stack:
    """Servers, a fresh database, migrations, then the API, a `webhooks` worker and beat."""
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
    # A shared broker may hold messages of an earlier run; ours must be the only work the worker sees.
    purge_queues(broker_url)
    exits.callback(purge_queues, broker_url)

    env = {
        "LLMOS_HOME": str(work / "home"),
        "LLMOS_DATABASE_URL": database_url,
        "LLMOS_BROKER_URL": broker_url,
        "LLMOS_API_PORT": str(free_port()),
        # The receiver listens on 127.0.0.1, which the address rule refuses by default.
        "LLMOS_WEBHOOK_ALLOW_PRIVATE": "1",
    }
    # The bench's own imports (emit_event, the Celery producer) read the same settings as the children.
    os.environ.update(env)
    from core.settings import get_settings

    get_settings.cache_clear()
    from db.session import get_engine
    from ops.bootstrap import migrate

    migrate()
    exits.callback(lambda: get_engine().dispose())

    stack = Stack(env, work / "logs", mode, broker_url, {})
    exits.callback(stack.stop_all)
    from ops.stack import argv

    api = stack.start("api", argv("api"))
    stack.start("worker-webhooks", argv("worker-webhooks"))
    stack.start("beat", argv("beat"))
    failure_logs.extend(stack.children.values())
    wait_http(f"{stack.api_url}/healthz", api)
    wait_until(webhooks_worker_ready, WORKERS_TIMEOUT, "a worker on the webhooks queue", 0.5)
    return stack


def queue_idle(broker_url: str) -> bool:
    """Nothing waiting on the webhooks queue and no flush task running."""
    import redis

    from domain.dispatch import QUEUE_WEBHOOKS
    from infra.broker import producer

    conn = redis.Redis.from_url(broker_url)
    try:
        if conn.llen(QUEUE_WEBHOOKS):
            return False
    finally:
        conn.close()
    active = producer().control.inspect(timeout=1.0).active() or {}
    return not any(task.get("name") == "llmos.webhooks.flush" for tasks in active.values() for task in tasks)


# --------------------------------------------------------------------------------------------------------
# Tenants, endpoints and events
# --------------------------------------------------------------------------------------------------------


@dataclass
class Tenant:
    name: str
    id: str
    api_url: str
    key: str
    endpoints: dict[str, str] = field(default_factory=dict)  # receiver path -> signing secret


def make_tenant(name: str, api_url: str) -> Tenant:
    from sqlalchemy import select

    from db.models import Tenant as TenantRow
    from db.session import transaction
    from ops.bootstrap import create_key

    key = create_key(name, ["webhooks"])[1]
    with transaction() as session:
        tenant_id = session.scalars(select(TenantRow.id).where(TenantRow.name == name)).one()
    return Tenant(name, tenant_id, api_url, key)


def register_endpoint(tenant: Tenant, rx: Receiver, index: int) -> str:
    """POST /v1/webhook_endpoints for every event type; returns the receiver path it points at."""
    path = f"/{tenant.name}/{index}"
    response = httpx.post(f"{tenant.api_url}/v1/webhook_endpoints", json={"url": rx.url + path, "events": ["*"]},
                          headers={"Authorization": f"Bearer {tenant.key}"}, timeout=60)
    if response.status_code != 200:
        raise RuntimeError(f"endpoint creation answered {response.status_code}: {response.text}")
    secret: str = response.json()["secret"]
    tenant.endpoints[path] = rx.secrets[path] = secret
    return path


@dataclass
class Commit:
    event_ids: list[str]
    started: float  # perf_counter just before session.commit()
    ended: float  # after commit() returned: the database commit and publishing every staged task
    published: int
    publish_s: float


@contextlib.contextmanager
def timed_publish() -> Iterator[list[float]]:
    """Time each `broker.publish` (the after-commit hook's broker send) made in this process."""
    from domain import dispatch
    from infra import broker

    durations: list[float] = []
    original = broker.publish

    def publish(task: dispatch.StagedTask) -> bool:
        started = time.perf_counter()
        try:
            return original(task)
        finally:
            durations.append(time.perf_counter() - started)

    with mock.patch.object(broker, "publish", publish):
        yield durations


def emit(tenant: Tenant, count: int, start: int = 0) -> Commit:
    """`count` outbox events of tenant in one transaction, through the real emit_event → fan_out path."""
    from db.session import session_factory
    from domain.events import emit_event

    session = session_factory()()
    try:
        ids = [emit_event(session, tenant.id, EVENT_TYPE, {"id": f"bench-model-{i}", "object": "model", "n": i}).id
               for i in range(start, start + count)]
        with timed_publish() as publishes:
            started = time.perf_counter()
            session.commit()
            ended = time.perf_counter()
    finally:
        session.close()
    return Commit(ids, started, ended, len(publishes), sum(publishes))


# --------------------------------------------------------------------------------------------------------
# What explains the figures: CPU per process, the sender's own timings, the flush tasks run
# --------------------------------------------------------------------------------------------------------


def _tree_cpu(pid: int) -> float:
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def _named_cpu(names: tuple[str, ...]) -> float:
    total = 0.0
    for proc in psutil.process_iter(["name", "cpu_times"]):
        if proc.info["name"] in names and proc.info["cpu_times"] is not None:
            total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


def cpu_snapshot(stack: Stack) -> dict[str, float]:
    me = psutil.Process().cpu_times()
    busy = psutil.cpu_times()
    snap = {name: _tree_cpu(child.popen.pid) for name, child in stack.children.items()}
    snap["bench (emitter + receiver)"] = me.user + me.system
    # Every backend on the server, other users' databases included when the server is shared.
    snap["postgres (all backends)"] = _named_cpu(("postgres", "postmaster"))
    snap["redis-server"] = _named_cpu(("redis-server",))
    snap["_busy"] = busy.user + busy.system + busy.nice + getattr(busy, "irq", 0.0) + getattr(busy, "softirq", 0.0)
    snap["_at"] = time.perf_counter()
    return snap


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per process over the phase, and each as a share of one core (1.0 = one core busy)."""
    wall = after["_at"] - before["_at"]
    used = {k: (after[k] - before[k]) / wall for k in before if not k.startswith("_")}
    machine = (after["_busy"] - before["_busy"]) / wall
    used["everything else on the machine"] = max(0.0, machine - sum(used.values()))
    used["machine (all processes)"] = machine
    return used


@dataclass
class SenderView:
    """From the delivery rows and attempts of a tenant, and the worker log lines of the phase."""

    attempts: int
    succeeded: int
    http_ms_mean: float
    http_ms_p99: float
    flush_tasks: int
    flush_busy: int  # flush tasks that sent at least one delivery
    flush_noop_s: float  # total time of the flush tasks that sent nothing
    flush_busy_s: float


def sender_view(tenant: Tenant, worker_log: Path, log_offset: int) -> SenderView:
    from sqlalchemy import func, select

    from db.models import DeliveryAttempt, WebhookDelivery
    from db.session import transaction

    with transaction() as session:
        durations = sorted(session.scalars(
            select(DeliveryAttempt.duration_ms).join(WebhookDelivery, WebhookDelivery.id == DeliveryAttempt.delivery_id)
            .where(WebhookDelivery.tenant_id == tenant.id)).all())
        succeeded = session.scalar(select(func.count()).select_from(WebhookDelivery).where(
            WebhookDelivery.tenant_id == tenant.id, WebhookDelivery.status == "succeeded")) or 0
    with worker_log.open("rb") as log:
        log.seek(log_offset)
        done = [(float(m.group(1)), int(m.group(2)))
                for m in FLUSH_DONE.finditer(log.read().decode(errors="replace"))]
    return SenderView(
        attempts=len(durations), succeeded=succeeded,
        http_ms_mean=statistics.fmean(durations) if durations else math.nan,
        http_ms_p99=percentile([float(d) for d in durations], 99) if durations else math.nan,
        flush_tasks=len(done), flush_busy=sum(1 for _, n in done if n),
        flush_noop_s=sum(s for s, n in done if not n), flush_busy_s=sum(s for s, n in done if n),
    )


@contextlib.contextmanager
def profiled(py_spy: str | None, stack: Stack, name: str) -> Iterator[Path | None]:
    """py-spy (sampling, --idle so time blocked on Postgres or the network shows) on the worker's processes."""
    if py_spy is None:
        yield None
        return
    out = stack.log_dir.parent / "profiles" / f"{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    with (stack.log_dir / f"py-spy-{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            [py_spy, "record", "--pid", str(stack.children["worker-webhooks"].popen.pid), "--subprocesses", "--idle",
             "--nonblocking", "--rate", "200", "--format", "raw", "-o", str(out)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            time.sleep(1.0)  # py-spy attaches before the phase starts
            yield out
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


PROFILE_RATE = 200  # py-spy samples per second and process
# Where a pool process's sample was, by the innermost of our frames on its stack (first match wins)...
STAGES = (
    ("_record (tasks/webhooks.py", "record attempt (2nd txn)"),
    ("_post (tasks/webhooks.py", "HTTP POST"),
    ("attempt_delivery (tasks/webhooks.py", "load + sign (1st txn)"),
    ("flush (tasks/webhooks.py", "flush: lock, due query"),
    ("dispatch_due (tasks/webhooks.py", "dispatch_due (beat)"),
)
# ... and what it was doing there, by its innermost frame.
OPERATIONS = (
    ("do_execute (", "SQL"),
    ("do_commit (", "COMMIT"),
    ("do_rollback (", "ROLLBACK"),
    ("do_ping (", "pre-ping"),
    ("httpcore/_backends", "socket"),
    ("redis/", "redis"),
)
IDLE_FRAME = "Connection._recv (billiard/connection.py"


@dataclass
class Profile:
    """Samples of the worker's pool processes: (stage, operation) -> count; idle waits for a task apart."""

    samples: dict[tuple[str, str], int]
    idle: int

    def ms_per(self, items: int, stage: str | None = None, op: str | None = None) -> float:
        count = sum(n for (st, o), n in self.samples.items() if stage in (None, st) and op in (None, o))
        return count * 1000 / PROFILE_RATE / items


def read_profile(path: Path) -> Profile:
    samples: dict[tuple[str, str], int] = {}
    idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        # --subprocesses: "process <worker>;process <pool child>;..." for a pool process.
        if not count.isdigit() or len(frames) < 2 or not frames[1].startswith("process "):
            continue
        if IDLE_FRAME in frames[-1]:
            idle += int(count)
            continue
        stage = next((name for key, name in STAGES if key in stack), "celery, other")
        op = next((name for key, name in OPERATIONS if key in frames[-1]), "Python")
        samples[(stage, op)] = samples.get((stage, op), 0) + int(count)
    return Profile(samples, idle)


def profile_table(profile: Profile, items: int) -> str:
    ops = [name for _, name in OPERATIONS if any(o == name for _, o in profile.samples)] + ["Python"]
    stages = [name for _, name in STAGES] + ["celery, other"]
    rows = [["ms per delivery (worker pool)", *ops, "total"]]
    for stage in stages:
        if any(st == stage for st, _ in profile.samples):
            rows.append([stage, *[f"{profile.ms_per(items, stage, op):.2f}" for op in ops],
                         f"{profile.ms_per(items, stage):.2f}"])
    rows.append(["total", *[f"{profile.ms_per(items, None, op):.2f}" for op in ops],
                 f"{profile.ms_per(items):.2f}"])
    return table(rows)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]  # nearest rank


# --------------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------------


@dataclass
class Verification:
    requests: int
    verified: int
    failures: list[str]


def verify(tenant: Tenant, arrivals: list[Arrival]) -> Verification:
    """The receiver's verdicts on every request to the tenant's endpoints (secrets from their creation)."""
    mine = [a for a in arrivals if a.path in tenant.endpoints]
    failures = [f"{a.path} {a.webhook_id}: {a.error}" for a in mine if a.error is not None]
    return Verification(len(mine), len(mine) - len(failures), failures)


def in_event_order(tenant: Tenant, arrivals: list[Arrival], event_ids: list[str]) -> bool:
    """Each endpoint received its first copies in the order the events were created."""
    rank = {event_id: i for i, event_id in enumerate(event_ids)}
    for path in tenant.endpoints:
        seen: list[int] = []
        firsts: set[str] = set()
        for arrival in arrivals:
            if arrival.path == path and arrival.webhook_id in rank and arrival.webhook_id not in firsts:
                firsts.add(arrival.webhook_id)
                seen.append(rank[arrival.webhook_id])
        if seen != sorted(seen):
            return False
    return True


@dataclass
class Throughput:
    label: str
    endpoints: int
    events: int
    deliveries: int
    build_s: float  # emit_event x N inside the transaction, before the commit
    commit_s: float  # session.commit(): database commit plus publishing the staged flush tasks
    published: int
    publish_s: float
    elapsed_s: float  # commit start -> last delivery's first arrival
    first_arrival_s: float
    drained_s: float  # commit start -> broker queue empty and no flush running
    requests: int
    in_order: bool
    verification: Verification
    cpu: dict[str, float]
    sender: SenderView
    profile: Profile | None

    @property
    def per_s(self) -> float:
        return self.deliveries / self.elapsed_s


def wait_idle(stack: Stack) -> None:
    wait_until(lambda: queue_idle(stack.broker_url), 600, "the webhooks queue to drain", 0.2)


def throughput(stack: Stack, rx: Receiver, label: str, endpoints: int, events: int, timeout: float,
               py_spy: str | None) -> Throughput:
    tenant = make_tenant(f"bench-{endpoints}x", stack.api_url)
    paths = [register_endpoint(tenant, rx, i) for i in range(endpoints)]
    wait_idle(stack)
    worker_log = stack.children["worker-webhooks"].log_path
    log_offset = worker_log.stat().st_size
    start_index = len(rx.arrivals)
    with profiled(py_spy, stack, f"throughput-{endpoints}") as profile_path:
        cpu_before = cpu_snapshot(stack)
        built = time.perf_counter()
        commit = emit(tenant, events)
        expected = {(path, event_id) for path in paths for event_id in commit.event_ids}
        last = rx.wait_for(expected, timeout)
        cpu_after = cpu_snapshot(stack)
    wait_idle(stack)
    drained = time.perf_counter()

    arrivals = rx.since(start_index)
    first = min(rx.first[key] for key in expected)
    return Throughput(
        label=label, endpoints=endpoints, events=events, deliveries=len(expected),
        build_s=commit.started - built, commit_s=commit.ended - commit.started, published=commit.published,
        publish_s=commit.publish_s, elapsed_s=last - commit.started, first_arrival_s=first - commit.started,
        drained_s=drained - commit.started, requests=len([a for a in arrivals if a.path in tenant.endpoints]),
        in_order=in_event_order(tenant, arrivals, commit.event_ids), verification=verify(tenant, arrivals),
        cpu=cpu_used(cpu_before, cpu_after), sender=sender_view(tenant, worker_log, log_offset),
        profile=read_profile(profile_path) if profile_path else None,
    )


@dataclass
class Latency:
    events: int
    spacing_s: float
    latencies: list[float]  # commit start -> first arrival, per event
    commit_s: list[float]
    requests: int
    in_order: bool
    verification: Verification
    sender: SenderView
    profile: Profile | None

    @property
    def label(self) -> str:
        return f"every {self.spacing_s * 1000:.0f} ms"

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def quarters(self) -> list[float]:
        """p50 of each quarter of the run, in order: rising means the sender falls behind the events."""
        n = len(self.latencies)
        parts = [self.latencies[i * n // 4:(i + 1) * n // 4] for i in range(4)]
        return [percentile(part, 50) for part in parts if part]


def latency(stack: Stack, rx: Receiver, events: int, spacing: float, timeout: float, py_spy: str | None) -> Latency:
    tenant = make_tenant(f"bench-latency-{spacing * 1000:.0f}ms", stack.api_url)
    path = register_endpoint(tenant, rx, 0)
    wait_idle(stack)
    worker_log = stack.children["worker-webhooks"].log_path
    log_offset = worker_log.stat().st_size
    start_index = len(rx.arrivals)

    commits: list[Commit] = []
    with profiled(py_spy, stack, f"latency-{spacing * 1000:.0f}ms") as profile_path:
        next_at = time.perf_counter()
        for i in range(events):
            commits.append(emit(tenant, 1, start=i))
            next_at += spacing
            time.sleep(max(0.0, next_at - time.perf_counter()))
        event_ids = [c.event_ids[0] for c in commits]
        rx.wait_for({(path, event_id) for event_id in event_ids}, timeout)
    wait_idle(stack)

    arrivals = rx.since(start_index)
    return Latency(
        events=events, spacing_s=spacing,
        latencies=[rx.first[(path, c.event_ids[0])] - c.started for c in commits],
        commit_s=[c.ended - c.started for c in commits],
        requests=len([a for a in arrivals if a.path in tenant.endpoints]),
        in_order=in_event_order(tenant, arrivals, event_ids), verification=verify(tenant, arrivals),
        sender=sender_view(tenant, worker_log, log_offset),
        profile=read_profile(profile_path) if profile_path else None,
    )


def warm_up(stack: Stack, rx: Receiver) -> None:
    """A few deliveries first, so no figure pays the worker's first connections and imports."""
    tenant = make_tenant("bench-warmup", stack.api_url)
    path = register_endpoint(tenant, rx, 0)
    for i in range(5):
        commit = emit(tenant, 1, start=i)
        rx.wait_for({(path, commit.event_ids[0])}, 60)
    wait_idle(stack)


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------


def cpu_idle_share(seconds: float = 1.0) -> float:
    """Share of all CPUs idle over ``seconds``: low before the bench starts means someone else is busy."""
    times = psutil.cpu_times_percent(interval=seconds)
    return round((times.idle + getattr(times, "iowait", 0.0)) / 100, 3)


def machine_facts() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "cpu_idle_start": cpu_idle_share(),
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def throughput_json(t: Throughput) -> dict[str, Any]:
    s = t.sender
    return {
        "endpoints": t.endpoints, "events": t.events, "deliveries": t.deliveries,
        "deliveries_per_s": round(t.per_s, 1), "elapsed_s": round(t.elapsed_s, 3),
        "first_arrival_s": round(t.first_arrival_s, 3), "queue_drained_s": round(t.drained_s, 3),
        "build_transaction_s": round(t.build_s, 3), "commit_s": round(t.commit_s, 3),
        "tasks_published": t.published, "publish_s": round(t.publish_s, 3),
        "requests_received": t.requests, "duplicates": t.requests - t.deliveries, "in_event_order": t.in_order,
        "signatures_verified": t.verification.verified, "signatures_failed": len(t.verification.failures),
        "sender": {"attempts": s.attempts, "succeeded": s.succeeded, "http_ms_mean": round(s.http_ms_mean, 2),
                   "http_ms_p99": round(s.http_ms_p99, 2), "flush_tasks": s.flush_tasks,
                   "flush_tasks_that_sent": s.flush_busy, "flush_noop_total_s": round(s.flush_noop_s, 3),
                   "flush_sending_total_s": round(s.flush_busy_s, 3)},
        "cpu_cores_used": {k: round(v, 3) for k, v in t.cpu.items()},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1000, help="events queued at once (1000)")
    parser.add_argument("--fanout", type=int, default=4, help="endpoints of the parallel variant (4)")
    parser.add_argument("--latency-events", type=int, default=200, help="events sent one at a time (200)")
    parser.add_argument("--spacing-ms", type=float, nargs="+", default=[50.0, 30.0],
                        help="gap between those events; one latency run per value (50 30)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a phase may take (600)")
    parser.add_argument("--profile", action="store_true",
                        help="sample the worker with py-spy (on PATH or --py-spy) during each phase")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="the py-spy binary for --profile")
    parser.add_argument("--keep", type=Path, help="copy the processes' logs (and profiles) here at the end")
    args = parser.parse_args(argv)
    if args.profile and not args.py_spy:
        parser.error("--profile needs py-spy on PATH or --py-spy PATH (pip install py-spy)")
    for name in ("events", "fanout", "latency_events"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(x < 0 for x in args.spacing_ms):
        parser.error("--spacing-ms must not be negative")
    return args


def report(command: str, facts: dict[str, Any], stack: Stack, runs: list[Throughput], lats: list[Latency]) -> None:
    print()
    print("Throughput: events created in one transaction, timed from its commit to the last first arrival")
    print(table([
        ["", "deliveries", "deliveries/s", "elapsed s", "first s", "commit s", "drained s", "dup", "order",
         "verified"],
        *[[t.label, str(t.deliveries), f"{t.per_s:.1f}", f"{t.elapsed_s:.2f}", f"{t.first_arrival_s:.3f}",
           f"{t.commit_s:.3f}", f"{t.drained_s:.2f}", str(t.requests - t.deliveries), "yes" if t.in_order else "NO",
           f"{t.verification.verified}/{t.verification.requests}"] for t in runs],
    ]))
    print("  first s: commit -> first arrival; drained s: commit -> no flush task left queued or running")
    print("  commit s: session.commit(), which publishes one flush task per delivery: "
          + ", ".join(f"{t.published} tasks in {t.publish_s:.2f}s" for t in runs))
    print("  building the transaction (emit_event x N, before the clock starts): "
          + ", ".join(f"{t.build_s:.2f}s" for t in runs))

    print()
    print("Latency: events one at a time, each its own transaction; from just before its commit to its receipt (ms)")
    print(table([
        ["", "events", "p50", "p90", "p99", "max", "min", "commit+publish p50", "p50 by quarter", "dup", "order",
         "verified"],
        *[[lat.label, str(lat.events), ms(lat.p(50)), ms(lat.p(90)), ms(lat.p(99)), ms(max(lat.latencies)),
           ms(min(lat.latencies)), ms(percentile(lat.commit_s, 50)), " ".join(ms(q) for q in lat.quarters),
           str(lat.requests - lat.events), "yes" if lat.in_order else "NO",
           f"{lat.verification.verified}/{lat.verification.requests}"] for lat in lats],
    ]))
    print("  p50 by quarter: the run cut in four, in order; rising figures mean the sender fell behind the events")

    print()
    print("Where the time goes (throughput phases; CPU in cores busy over the phase, this machine's total = "
          f"{facts['cpus_usable']}.0)")
    names = list(runs[0].cpu)
    print(table([
        ["", *[t.label for t in runs]],
        *[[f"cpu {name}", *[f"{t.cpu[name]:.2f}" for t in runs]] for name in names],
        ["per delivery, wall ms (elapsed / deliveries)", *[f"{1000 / t.per_s:.2f}" for t in runs]],
        ["sender's HTTP round trip, mean ms", *[f"{t.sender.http_ms_mean:.2f}" for t in runs]],
        ["sender's HTTP round trip, p99 ms", *[f"{t.sender.http_ms_p99:.2f}" for t in runs]],
        ["flush tasks run", *[str(t.sender.flush_tasks) for t in runs]],
        ["  that sent something", *[str(t.sender.flush_busy) for t in runs]],
        ["  time in those, s", *[f"{t.sender.flush_busy_s:.2f}" for t in runs]],
        ["  time in no-op flushes, s", *[f"{t.sender.flush_noop_s:.2f}" for t in runs]],
    ]))
    profiled_runs = [(t.label, t.profile, t.deliveries) for t in runs]
    profiled_runs += [(f"latency {lat.label}", lat.profile, lat.events) for lat in lats]
    for label, profile, items in profiled_runs:
        if profile is not None:
            print()
            print(f"py-spy, {label}: sampled time of the worker's pool processes per delivery, by stage of "
                  f"tasks/webhooks.py and by what the innermost frame was doing (SQL, COMMIT, ROLLBACK, pre-ping: "
                  f"waiting on Postgres); idle, waiting for a task: "
                  f"{profile.idle * 1000 / PROFILE_RATE / items:.2f} ms")
            print(profile_table(profile, items))

    verifications = [t.verification for t in runs] + [lat.verification for lat in lats]
    failures = [f for v in verifications for f in v.failures]
    verified = sum(v.verified for v in verifications)
    requests = sum(v.requests for v in verifications)
    print()
    print(f"signatures: {verified} of {requests} requests verified with standardwebhooks"
          + ("" if not failures else f"; FAILED: {failures[:5]}"))
    facts["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    facts["cpu_idle_end"] = cpu_idle_share()
    print(f"load average at end: {' '.join(str(x) for x in facts['loadavg_end'])}; CPU idle over 1 s after "
          f"stopping everything: {facts['cpu_idle_end'] * 100:.0f}%")
    print(json.dumps({
        "command": command,
        "machine": facts,
        "services": stack.mode,
        "worker": "python -m ops.cli worker --queues cpu (default concurrency)",
        "throughput": {t.label: throughput_json(t) for t in runs},
        "latency": {lat.label: {
            "events": lat.events, "spacing_ms": round(lat.spacing_s * 1000, 1),
            "p50_ms": round(lat.p(50) * 1000, 2), "p90_ms": round(lat.p(90) * 1000, 2),
            "p99_ms": round(lat.p(99) * 1000, 2), "max_ms": round(max(lat.latencies) * 1000, 2),
            "min_ms": round(min(lat.latencies) * 1000, 2),
            "commit_publish_p50_ms": round(percentile(lat.commit_s, 50) * 1000, 2),
            "p50_ms_by_quarter": [round(q * 1000, 1) for q in lat.quarters],
            "requests_received": lat.requests, "in_event_order": lat.in_order,
            "signatures_verified": lat.verification.verified,
            "http_ms_mean": round(lat.sender.http_ms_mean, 2), "flush_tasks": lat.sender.flush_tasks,
        } for lat in lats},
        "signatures": {"verified": verified, "requests": requests, "failed": len(failures)},
        "targets": {"deliveries_per_s_min": 200, "latency_p50_ms_max": 1000},
    }))


def run(args: argparse.Namespace, work: Path) -> None:
    facts = machine_facts()
    command = shlex.join(["python", *sys.argv])
    print(f"command: {command}")
    print(f"machine: {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable) {facts['cpu_model']}; "
          f"Python {facts['python']}; {facts['platform']}")
    print(f"load average at start: {' '.join(str(x) for x in facts['loadavg_start'])}; CPU idle over 1 s "
          f"before starting anything: {facts['cpu_idle_start'] * 100:.0f}%")

    failure_logs: list[Child] = []
    with contextlib.ExitStack() as exits:
        try:
            started = time.perf_counter()
            stack = bring_up(exits, work, failure_logs)
            # Its senders: a threads pool of webhook_concurrency (QUEUE_PROFILES in ops/cli.py).
            from core.settings import get_settings

            facts["webhooks_worker_threads"] = get_settings().webhook_concurrency
            print(f"services: {stack.mode}; stack up in {time.perf_counter() - started:.1f}s; "
                  f"webhooks worker sender threads: {facts['webhooks_worker_threads']}")
            rx = exits.enter_context(receiver())
            warm_up(stack, rx)
            py_spy = args.py_spy if args.profile else None
            runs = [
                throughput(stack, rx, "1 endpoint", 1, args.events, args.timeout, py_spy),
                throughput(stack, rx, f"{args.fanout} endpoints", args.fanout, args.events, args.timeout, py_spy),
            ]
            lats = [latency(stack, rx, args.latency_events, spacing / 1000, args.timeout, py_spy)
                    for spacing in args.spacing_ms]
        except BaseException:
            for child in failure_logs:
                print(f"--- last lines of {child.name} ({child.log_path}) ---\n{child.tail()}", file=sys.stderr)
            raise
    report(command, facts, stack, runs, lats)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) must unwind the finally blocks that stop servers and processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with scratch_dir() as work:
        try:
            run(args, work)
        finally:
            if args.keep is not None:
                # Once every process has stopped, so the logs are complete.
                shutil.copytree(work, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("pg", "redis"))


if __name__ == "__main__":
    main()
