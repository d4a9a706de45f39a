"""Embedded Postgres and Redis: real servers in temporary directories, no mocks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import psycopg2
import pytest
import redis

from ops.embedded import (
    POSTGRES_SYSTEM_USER,
    ROOT_AREA,
    EmbeddedServer,
    EmbeddedServerError,
    cluster_dir,
    free_port,
    start_postgres,
    start_redis,
    stop_server,
)
from tests.conftest import gone, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


def tree(server: EmbeddedServer) -> list[int]:
    """PIDs of a server and all its descendants right now."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    return [server.process.pid, *(child.pid for child in children)]


def connect(server: EmbeddedServer) -> psycopg2.extensions.connection:
    """psycopg2 connection to the server's URL (SQLAlchemy's driver suffix removed)."""
    return psycopg2.connect(server.url.replace("postgresql+psycopg2://", "postgresql://"), connect_timeout=5)


def test_postgres_and_redis_roundtrip(workdir: Path, servers: list[EmbeddedServer]) -> None:
    pg = start_postgres(workdir / "postgres")
    servers.append(pg)
    rd = start_redis(workdir / "redis")
    servers.append(rd)
    pg_password = (workdir / "postgres.password").read_text().strip()
    rd_password = (workdir / "redis.password").read_text().strip()
    assert pg.url == f"postgresql+psycopg2://postgres:{pg_password}@127.0.0.1:{pg.port}/llmos"
    assert rd.url == f"redis://:{rd_password}@127.0.0.1:{rd.port}/0"

    with connect(pg) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_database(), current_user, pg_encoding_to_char(encoding) "
                    "FROM pg_database WHERE datname = current_database()")
        assert cur.fetchone() == ("llmos", "postgres", "UTF8")
    conn.close()
    if os.geteuid() == 0:
        assert psutil.Process(pg.process.pid).username() == POSTGRES_SYSTEM_USER
        assert cluster_dir(workdir / "postgres").is_relative_to(ROOT_AREA)

    client = redis.Redis.from_url(rd.url)
    client.set("greeting", "hello")
    assert client.get("greeting") == b"hello"
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    client.close()

    pids = tree(pg) + tree(rd)
    assert len(pids) > 2  # postgres has auxiliary processes
    stop_server(pg)
    stop_server(rd)
    assert pg.process.returncode == 0
    assert rd.process.returncode == 0
    assert all(gone(pid) for pid in pids)
    stop_server(pg)  # stopping again is harmless


def test_two_postgres_side_by_side(workdir: Path, servers: list[EmbeddedServer]) -> None:
    first = start_postgres(workdir / "one")
    servers.append(first)
    # A long path forces the unix socket out of the data directory (sun_path holds 107 bytes).
    long_dir = workdir / ("x" * 60) / ("y" * 40) / "two"
    second = start_postgres(long_dir)
    servers.append(second)
    assert first.port != second.port

    with connect(first) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE only_here (v int)")
    conn.close()
    placed = cluster_dir(long_dir)
    with connect(second) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('only_here') IS NULL, current_setting('data_directory')")
        assert cur.fetchone() == (True, str(placed))
    conn.close()

    socket_dir = Path((placed / "postmaster.pid").read_text().splitlines()[4])
    if placed == long_dir:  # as root the cluster lives in root's area, under a short path
        assert socket_dir != long_dir
    assert (socket_dir / f".s.PGSQL.{second.port}").exists()
    stop_server(first)
    stop_server(second)
    shutil.rmtree(socket_dir, ignore_errors=True)


def test_postgres_restart_keeps_data(workdir: Path, servers: list[EmbeddedServer]) -> None:
    data_dir = workdir / "postgres"
    pg = start_postgres(data_dir)
    servers.append(pg)
    with connect(pg) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE jobs (id text PRIMARY KEY)")
        cur.execute("INSERT INTO jobs VALUES ('ftjob-1')")
    conn.close()
    stop_server(pg)

    # A postmaster.pid naming a live process that is not postgres (pid reuse) must not block the start.
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (cluster_dir(data_dir) / "postmaster.pid").write_text(f"{unrelated.pid}\n{cluster_dir(data_dir)}\n")
        again = start_postgres(data_dir)
        servers.append(again)
    finally:
        unrelated.kill()
        unrelated.wait()
    with connect(again) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM jobs")
        assert cur.fetchall() == [("ftjob-1",)]
    conn.close()


def test_leftover_postmaster_is_stopped(workdir: Path, servers: list[EmbeddedServer]) -> None:
    data_dir = workdir / "postgres"
    old = start_postgres(data_dir)
    servers.append(old)
    old_pids = tree(old)

    new = start_postgres(data_dir)
    servers.append(new)
    old.process.wait(timeout=10)
    wait_until(lambda: all(gone(pid) for pid in old_pids), what="old postmaster tree to exit")
    with connect(new) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    conn.close()


def test_redis_queue_survives_restart(workdir: Path, servers: list[EmbeddedServer]) -> None:
    rd = start_redis(workdir / "redis")
    servers.append(rd)
    client = redis.Redis.from_url(rd.url)
    client.rpush("celery", "task-1", "task-2")
    client.close()
    stop_server(rd)
    assert gone(rd.process.pid)

    again = start_redis(workdir / "redis")
    servers.append(again)
    client = redis.Redis.from_url(again.url)
    assert client.lrange("celery", 0, -1) == [b"task-1", b"task-2"]
    client.close()


def test_leftover_redis_is_stopped(workdir: Path, servers: list[EmbeddedServer]) -> None:
    old = start_redis(workdir / "redis")
    servers.append(old)
    assert (workdir / "redis" / "redis.pid").read_text().strip() == str(old.process.pid)
    new = start_redis(workdir / "redis")
    servers.append(new)
    old.process.wait(timeout=10)
    assert redis.Redis.from_url(new.url).ping()


def test_taken_port_is_a_clear_error(workdir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match="in use"):
            start_redis(workdir / "redis", port=port)
        with pytest.raises(EmbeddedServerError, match="in use"):
            start_postgres(workdir / "postgres", port=port)


def test_free_port_is_bindable_and_never_a_listening_one() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        ports = [free_port() for _ in range(20)]
        assert taken not in ports
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[-1]))
        assert sock.getsockname()[1] == ports[-1]


RUNNER = """
import sys, time
from pathlib import Path
from ops.embedded import start_postgres, start_redis
base = Path(sys.argv[1])
pg = start_postgres(base / "postgres")
rd = start_redis(base / "redis")
(base / "pids.tmp").write_text(f"{pg.process.pid} {rd.process.pid}")
(base / "pids.tmp").rename(base / "pids")
time.sleep(120)
"""


def test_servers_stop_when_owner_is_killed(workdir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    owner = subprocess.Popen([sys.executable, "-c", RUNNER, str(workdir)], env=env)
    try:
        wait_until(lambda: (workdir / "pids").exists() or owner.poll() is not None, 30, "servers to start")
        assert owner.poll() is None, "runner failed to start the servers"
        pg_pid, redis_pid = (int(pid) for pid in (workdir / "pids").read_text().split())
        pids = [pg_pid, redis_pid, *(c.pid for c in psutil.Process(pg_pid).children(recursive=True))]
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        wait_until(lambda: all(gone(pid) for pid in pids), 20, "servers to exit after their owner died")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


UP_LIKE = """
import sys
from pathlib import Path
from ops.embedded import start_postgres, start_redis, stop_server
from ops.supervisor import ChildSpec, Supervisor

base = Path(sys.argv[1])
pg = start_postgres(base / "postgres")
rd = start_redis(base / "redis")
sup = Supervisor(base / "logs")
sup.adopt("postgres", pg.process, stop_signal=pg.stop_signal)
sup.adopt("redis", rd.process, stop_signal=rd.stop_signal)
code = "import psycopg2, sys, time; c = psycopg2.connect(sys.argv[1]); time.sleep(120)"
sup.add(ChildSpec("client", [sys.executable, "-c", code, pg.url.replace("+psycopg2", "")]))
(base / "pids.tmp").write_text(f"{pg.process.pid} {rd.process.pid}")
(base / "pids.tmp").rename(base / "pids")
sup.run_until_signal()
"""


def test_up_like_shutdown_stops_clients_then_servers(workdir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    main = subprocess.Popen([sys.executable, "-c", UP_LIKE, str(workdir)], env=env, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (workdir / "pids").exists() or main.poll() is not None, 30, "servers to start")
        assert main.poll() is None, main.communicate()[1].decode()
        pg_pid, redis_pid = (int(pid) for pid in (workdir / "pids").read_text().split())

        def client_connected() -> bool:
            return any("postgres: postgres llmos" in " ".join(child.cmdline())
                       for child in psutil.Process(pg_pid).children())

        wait_until(client_connected, what="the client's backend")
        pids = [pg_pid, redis_pid, *(c.pid for c in psutil.Process(pg_pid).children(recursive=True))]
        pids += [c.pid for c in psutil.Process(main.pid).children(recursive=True)]
        main.send_signal(signal.SIGTERM)
        _out, err = main.communicate(timeout=30)
        assert main.returncode == 0, err.decode()
        assert all(gone(pid) for pid in pids)
        assert "killing" not in err.decode()  # everything stopped gracefully, no SIGKILL needed
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs postgres as another user")
def test_as_root_no_parent_directory_is_opened_to_other_users(workdir: Path, servers: list[EmbeddedServer]) -> None:
    # A home inside a private directory, as root's own home is (/root is 0700).
    private = workdir / "private"
    private.mkdir(mode=0o700)
    home = private / "home"
    home.mkdir(mode=0o700)
    before = {path: path.stat().st_mode for path in (workdir, private, home)}
    pg = start_postgres(home / "postgres")
    servers.append(pg)
    with connect(pg) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('data_directory')")
        (data_directory,) = cur.fetchone()
    conn.close()
    # Postgres runs as its own user from root's area; nothing on the way to the home changed mode.
    assert Path(data_directory) == cluster_dir(home / "postgres") and Path(data_directory).is_relative_to(ROOT_AREA)
    assert {path: path.stat().st_mode for path in before} == before
    assert (Path(data_directory).parent / "origin").read_text().strip() == str(home / "postgres")
    assert (home / "postgres.password").stat().st_mode & 0o777 == 0o600
    stop_server(pg)
