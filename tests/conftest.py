"""Real services for the suite: Postgres, Redis, the API as a process and Celery worker processes.

With LLMOS_DATABASE_URL / LLMOS_BROKER_URL set (CI sets the machine's servers) the suite creates a
fresh database on that Postgres; otherwise it starts embedded Postgres and Redis itself.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
KEEP_TABLES = {"alembic_version"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition",
               interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def gone(pid: int) -> bool:
    """True when `pid` no longer runs (a zombie left for a non-reaping init counts as gone)."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _fresh_database(server_url: str) -> str:
    url = make_url(server_url)
    name = f"llmos_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def _drop_database(db_url: str) -> None:
    url = make_url(db_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Scratch dir for embedded servers, directly under the system temp dir, removed afterwards.

    Not tmp_path: each pytest session resets /tmp/pytest-of-<user> to 0700, which would lock the
    unprivileged postgres user out of its data dir whenever another pytest session starts meanwhile.
    """
    from ops.embedded import remove_orphan_clusters

    path = Path(tempfile.mkdtemp(prefix="llmos-ops-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
    remove_orphan_clusters()  # as root, the clusters started here live outside it


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_clusters() -> Iterator[None]:
    """As root, embedded clusters live in root's area; those of homes the tests removed go with them."""
    from ops.embedded import remove_orphan_clusters

    yield
    remove_orphan_clusters()


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    """Collects embedded servers a test starts and stops any still running at teardown."""
    from ops.embedded import stop_server

    started: list[Any] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            stop_server(server, timeout=5.0)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Database and broker URLs for this run, with the schema migrated and base models registered."""
    from ops.stack import start_servers

    home = tmp_path_factory.mktemp("llmos-home")
    # Embedded servers (as `llmos up` starts them) for whichever URL is not set. Not under pytest's tmp
    # dir: it is 0700, and embedded Postgres runs as its own user when root.
    servers = start_servers(Path(tempfile.mkdtemp(prefix="llmos-test-servers-")),
                            os.environ.get("LLMOS_DATABASE_URL"), os.environ.get("LLMOS_BROKER_URL"))
    database_server, broker_url = servers.database_url, servers.broker_url
    database_url = _fresh_database(database_server)
    env = {
        "LLMOS_HOME": str(home),
        "LLMOS_DATABASE_URL": database_url,
        "LLMOS_BROKER_URL": broker_url,
        # Fast cadence so cancel and progress tests finish in seconds.
        "LLMOS_HEARTBEAT_SECONDS": "0.3",
        "LLMOS_PROGRESS_EVENT_SECONDS": "0",
        # The one-minute GGUF conversion has its own slow-marked test.
        "LLMOS_CONVERT_GGUF_MODELS": "0",
        # A killed worker is noticed within seconds rather than minutes.
        "LLMOS_STALE_HEARTBEAT_SECONDS": "5",
        "LLMOS_RECONCILE_SECONDS": "1",
        "LLMOS_WEBHOOK_ALLOW_PRIVATE": "1",
        # Webhook retries in seconds, not hours, and beat checking for them twice a second.
        "LLMOS_WEBHOOK_RETRY_SCHEDULE": "1,1,1",
        "LLMOS_WEBHOOK_DISPATCH_SECONDS": "0.5",
        # A small cap so the 413 paths are exercised with real bodies.
        "LLMOS_MAX_UPLOAD_BYTES": str(1_000_000),
        "LLMOS_API_PORT": str(free_port()),
        # Batch tests span several chunks with a few dozen lines (workers read it; the default is 500).
        "LLMOS_BATCH_CHUNK_LINES": "20",
        # Jobs' MLflow integrations may use sqlite stores here (tests/api/test_integrations.py).
        "LLMOS_MLFLOW_LOCAL_ROOT": str(home / "mlflow"),
    }
    # The suite's own imports (bootstrap, the Celery producer, repositories) read the same settings as the
    # processes it starts; the environment is given back as it was when the session ends.
    saved_environ = dict(os.environ)
    os.environ.update(env)
    from core.settings import get_settings

    get_settings.cache_clear()
    from ops.bootstrap import migrate, register_base_models

    migrate()
    register_base_models(Path(home) / "models")
    _purge_queues(broker_url)
    yield {**env, "home": str(home)}
    from db.session import get_engine

    get_engine().dispose()
    _drop_database(database_url)
    os.environ.clear()
    os.environ.update(saved_environ)
    get_settings.cache_clear()
    servers.stop()


def _purge_queues(broker_url: str) -> None:
    import redis

    if broker_url.startswith("redis"):
        conn = redis.Redis.from_url(broker_url)
        conn.delete("gpu", "cpu", "inference", "webhooks")


class Process:
    """A child process of the suite, its output kept in a log file for failures."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv, self.env = argv, env
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(argv, env={**os.environ, **env}, cwd=ROOT, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, timeout: float = 20.0) -> None:
        import signal

        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()

    def respawn(self, name: str) -> Process:
        """A fresh process with this one's command and environment, as a supervisor restarts it; its log is
        `name`.log. Stops this one first (only closing its log, when it already exited)."""
        self.stop()
        return Process(name, self.argv, self.env, self.log_path.parent)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="session")
def stack(services: dict[str, str]) -> Iterator[dict[str, Process]]:
    """The API, the three worker kinds and beat as real processes, with the commands `llmos up` runs."""
    from ops import stack as deployment

    log_dir = Path(services["home"]) / "logs"
    log_dir.mkdir(exist_ok=True)
    env = {k: v for k, v in services.items() if k.startswith("LLMOS_")}
    procs = {role: Process(role, deployment.argv(role), env, log_dir) for role in deployment.SERVICE}
    base = f"http://127.0.0.1:{services['LLMOS_API_PORT']}"

    def api_up() -> bool:
        if procs["api"].popen.poll() is not None:
            raise AssertionError(f"API exited:\n{procs['api'].tail()}")
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(api_up, 60, "the API to answer /healthz")
    yield procs
    for proc in procs.values():
        proc.stop()


@pytest.fixture(scope="session")
def api_url(stack: dict[str, Process], services: dict[str, str]) -> str:
    return f"http://127.0.0.1:{services['LLMOS_API_PORT']}"


@pytest.fixture(autouse=True)
def clean_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test that uses the database starts from empty tables (base models kept)."""
    if "services" not in request.fixturenames:
        yield
        return
    request.getfixturevalue("services")
    from sqlalchemy.exc import OperationalError

    from db.session import get_engine

    # Workers and beat keep touching these tables; TRUNCATE can lose a deadlock to them, so retry.
    for attempt in range(10):
        try:
            with get_engine().begin() as conn:
                tables = [r[0] for r in conn.execute(text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))]
                doomed = [t for t in tables if t not in KEEP_TABLES]
                conn.execute(text("SET LOCAL lock_timeout = '5s'"))
                conn.execute(text(f"TRUNCATE {', '.join(doomed)} CASCADE"))
            break
        except OperationalError:
            if attempt == 9:
                raise
    from core.settings import get_settings
    from ops.bootstrap import register_base_models

    register_base_models(get_settings().models_dir)
    yield


@pytest.fixture
def make_key(services: dict[str, str]) -> Callable[..., str]:
    """Create an API key: make_key(tenant="acme", scopes=[...]) → plaintext."""
    from ops.bootstrap import create_key

    def make(tenant: str = "acme", scopes: list[str] | None = None) -> str:
        scopes = scopes or ["files", "fine_tuning", "batches", "inference", "webhooks"]
        return create_key(tenant, scopes)[1]

    return make


class Api:
    """A thin authenticated client for the tests."""

    def __init__(self, base: str, key: str | None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=base, headers=headers, timeout=90)

    def upload(self, content: str | bytes, purpose: str = "fine-tune", name: str = "train.jsonl") -> Any:
        data = content.encode() if isinstance(content, str) else content
        return self.http.post("/v1/files", data={"purpose": purpose}, files={"file": (name, data)})

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/fine_tuning/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Every event of a job, oldest first (read page by page, as a client would)."""
        events: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self.http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
            events.extend(page["data"])
            if not page["has_more"]:
                return events[::-1]
            params["after"] = page["data"][-1]["id"]

    def messages(self, job_id: str) -> list[str]:
        """A job's event messages, oldest first."""
        return [e["message"] for e in self.events(job_id)]

    def wait_status(self, job_id: str, statuses: set[str], timeout: float = 180) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in statuses else None

        result: dict[str, Any] = wait_until(reached, timeout, f"job {job_id} to reach {statuses}", 0.2)
        return result


@pytest.fixture
def api(api_url: str, make_key: Callable[..., str]) -> Api:
    return Api(api_url, make_key())


@pytest.fixture
def anon(api_url: str) -> Api:
    return Api(api_url, None)
