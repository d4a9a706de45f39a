"""Supervisor: real child processes, no mocks; waits poll with deadlines."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.supervisor import ChildSpec, Supervisor
from tests.conftest import gone, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]

# Child that starts a grandchild, publishes both pids atomically, then waits.
# argv: pidfile, "ignore-term" to make both ignore SIGTERM, "escape" to put the grandchild in a new session.
PARENT_OF_GRANDCHILD = """
import os, signal, subprocess, sys, time
pidfile, mode = sys.argv[1], sys.argv[2]
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen(
    [sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"],
    start_new_session=(mode == "escape"),
)
with open(pidfile + ".tmp", "w") as out:
    out.write(f"{os.getpid()} {grandchild.pid}")
os.rename(pidfile + ".tmp", pidfile)
while True:
    time.sleep(1)
"""


def read_pids(pidfile: Path) -> list[int]:
    """Wait for a child's pid file and return the pids in it."""
    wait_until(pidfile.exists, what=f"{pidfile.name} to be written")
    return [int(pid) for pid in pidfile.read_text().split()]


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    """A supervisor with fast backoff that is always stopped at teardown."""
    sup = Supervisor(tmp_path / "logs", backoff_initial=0.2, backoff_max=0.8)
    yield sup
    sup.stop(timeout=2.0)


def test_restarts_a_child_that_exits_with_backoff(
    tmp_path: Path, supervisor: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ops.supervisor")
    supervisor.add(ChildSpec("flaky", [sys.executable, "-c", "print('up'); raise SystemExit(3)"]))
    supervisor.start()

    def restarted_three_times() -> bool:
        supervisor.poll()
        return supervisor.restart_count("flaky") >= 3

    wait_until(restarted_three_times, what="three restarts")
    starts = supervisor.restart_times("flaky")
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    # Backoff doubles: 0.2, 0.4, 0.8 (capped at backoff_max).
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8
    assert "flaky" in caplog.text and "exit code 3" in caplog.text
    log_text = (tmp_path / "logs" / "flaky.log").read_text()
    assert log_text.count("up\n") >= 3  # appended across restarts


def test_backoff_resets_after_a_stable_run(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs", backoff_initial=0.1, backoff_max=10.0, stable_after=0.0)
    sup.add(ChildSpec("quick", [sys.executable, "-c", "pass"]))
    sup.start()
    try:
        def restarted_five_times() -> bool:
            sup.poll()
            return sup.restart_count("quick") >= 5

        wait_until(restarted_five_times, what="five restarts")
        gaps = [later - earlier for earlier, later in itertools.pairwise(sup.restart_times("quick"))]
        # Every run counts as stable, so the delay stays 0.1 s; doubling would make the fifth 1.6 s.
        assert gaps[4] < 1.0
    finally:
        sup.stop(timeout=2.0)


def test_stop_kills_child_and_grandchild(tmp_path: Path, supervisor: Supervisor) -> None:
    pidfile = tmp_path / "pids"
    supervisor.add(ChildSpec("parent", [sys.executable, "-c", PARENT_OF_GRANDCHILD, str(pidfile), "plain"]))
    supervisor.start()
    child, grandchild = read_pids(pidfile)
    assert supervisor.pid("parent") == child
    assert os.getpgid(child) == child != os.getpgrp()  # own session and group

    started = time.monotonic()
    supervisor.stop(timeout=10.0)
    assert time.monotonic() - started < 5.0  # SIGTERM sufficed, no wait for the deadline
    assert gone(child) and gone(grandchild)
    supervisor.stop()  # idempotent
    supervisor.poll()  # no restarts after stop
    assert supervisor.pid("parent") is None


def test_stop_escalates_to_sigkill(tmp_path: Path, supervisor: Supervisor) -> None:
    pidfile = tmp_path / "pids"
    argv = [sys.executable, "-c", PARENT_OF_GRANDCHILD, str(pidfile), "ignore-term"]
    supervisor.add(ChildSpec("stubborn", argv))
    supervisor.start()
    child, grandchild = read_pids(pidfile)

    started = time.monotonic()
    supervisor.stop(timeout=1.0)
    assert time.monotonic() - started >= 1.0
    assert gone(child) and gone(grandchild)


def test_stop_kills_grandchild_that_left_the_group(tmp_path: Path, supervisor: Supervisor) -> None:
    pidfile = tmp_path / "pids"
    supervisor.add(ChildSpec("escaper", [sys.executable, "-c", PARENT_OF_GRANDCHILD, str(pidfile), "escape"]))
    supervisor.start()
    child, grandchild = read_pids(pidfile)
    assert os.getpgid(grandchild) != os.getpgid(child)

    supervisor.stop(timeout=1.0)
    assert gone(child) and gone(grandchild)


def test_dead_childs_orphans_are_killed_before_restart(tmp_path: Path, supervisor: Supervisor) -> None:
    pidfile = tmp_path / "pids"
    supervisor.add(ChildSpec("parent", [sys.executable, "-c", PARENT_OF_GRANDCHILD, str(pidfile), "plain"]))
    supervisor.start()
    child, grandchild = read_pids(pidfile)
    pidfile.unlink()
    os.kill(child, signal.SIGKILL)

    def restarted() -> bool:
        supervisor.poll()
        return supervisor.restart_count("parent") >= 1

    wait_until(restarted, what="restart")
    assert gone(grandchild)
    new_child, _new_grandchild = read_pids(pidfile)
    assert new_child != child


def test_env_and_cwd_are_applied(tmp_path: Path, supervisor: Supervisor) -> None:
    out = tmp_path / "out"
    code = "import os, pathlib; pathlib.Path('out').write_text(os.environ['LLMOS_TEST'] + ' ' + os.getcwd())"
    supervisor.add(ChildSpec("env", [sys.executable, "-c", code], env={"LLMOS_TEST": "yes"}, cwd=tmp_path))
    supervisor.start()
    wait_until(out.exists, what="child output")
    assert out.read_text() == f"yes {tmp_path}"


# Spawned child that records, on SIGTERM, whether the adopted "server" (pid argv[2]) is still alive.
RECORDS_SERVER_ON_TERM = """
import os, signal, sys, time
out, server = sys.argv[1], int(sys.argv[2])
def on_term(signum, frame):
    try:
        os.kill(server, 0)
        state = "alive"
    except ProcessLookupError:
        state = "gone"
    with open(out, "w") as f:
        f.write(state)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(out + ".ready", "w").close()
while True:
    time.sleep(1)
"""


def test_adopted_process_is_stopped_after_children_and_not_restarted(
    tmp_path: Path, supervisor: Supervisor
) -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"], start_new_session=True
    )
    supervisor.adopt("server", server)
    out = tmp_path / "state"
    supervisor.add(ChildSpec("client", [sys.executable, "-c", RECORDS_SERVER_ON_TERM, str(out), str(server.pid)]))
    supervisor.start()
    wait_until(Path(f"{out}.ready").exists, what="client to install its handler")

    supervisor.stop(timeout=5.0)
    assert out.read_text() == "alive"  # the server outlived its client
    assert server.poll() == -signal.SIGTERM


def test_adopted_process_without_factory_is_not_restarted(
    supervisor: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    server = subprocess.Popen([sys.executable, "-c", "raise SystemExit(5)"], start_new_session=True)
    supervisor.adopt("server", server)
    supervisor.start()
    server.wait(timeout=10)
    with caplog.at_level(logging.INFO, logger="ops.supervisor"):
        # Polled as `llmos up` polls it, for longer than the longest backoff a wrongly scheduled restart
        # would wait: the exit is noticed, and nothing is started in its place.
        watched_until = time.monotonic() + 3 * supervisor.backoff_max
        while time.monotonic() < watched_until:
            supervisor.poll()
            assert supervisor.restart_count("server") == 0
            time.sleep(0.05)
    assert supervisor.pid("server") is None
    assert "not restartable" in caplog.text


def test_adopted_process_with_factory_is_restarted(supervisor: Supervisor) -> None:
    def launch() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"], start_new_session=True
        )

    first = launch()
    supervisor.adopt("server", first, restart=launch)
    supervisor.start()
    first.kill()

    def restarted() -> bool:
        supervisor.poll()
        return supervisor.restart_count("server") == 1 and supervisor.pid("server") is not None

    wait_until(restarted, what="adopted process restart")
    second = supervisor.pid("server")
    assert second is not None and second != first.pid
    supervisor.stop(timeout=5.0)
    assert gone(second)


# Supervisor process for signal tests. argv: base dir, "serve" (run_until_signal) or "start" (start + sleep).
SUPERVISOR_MAIN = """
import logging, sys, time
from pathlib import Path
from ops.supervisor import ChildSpec, Supervisor

logging.basicConfig(level=logging.INFO)
base, mode, child_code = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sup = Supervisor(base / "logs")
sup.add(ChildSpec("parent", [sys.executable, "-c", child_code, str(base / "pids"), "plain"]))
if mode == "serve":
    sup.run_until_signal(lambda: (base / "servers-stopped").write_text("yes"))
else:
    sup.start()
    time.sleep(120)
"""


def run_supervisor_process(tmp_path: Path, mode: str) -> subprocess.Popen[bytes]:
    """Start a separate Python process that runs a Supervisor with one child and one grandchild."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR_MAIN, str(tmp_path), mode, PARENT_OF_GRANDCHILD],
        env=env,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_until_signal_stops_everything(tmp_path: Path, sig: signal.Signals) -> None:
    main = run_supervisor_process(tmp_path, "serve")
    try:
        child, grandchild = read_pids(tmp_path / "pids")
        main.send_signal(sig)
        _out, err = main.communicate(timeout=20)
        assert main.returncode == 0, err.decode()
        assert gone(child) and gone(grandchild)
        assert (tmp_path / "servers-stopped").read_text() == "yes"
        assert sig.name in err.decode()
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()


def test_children_stop_when_supervisor_is_killed(tmp_path: Path) -> None:
    main = run_supervisor_process(tmp_path, "start")
    try:
        child, _grandchild = read_pids(tmp_path / "pids")
        main.kill()
        main.wait(timeout=10)
        # PR_SET_PDEATHSIG makes the kernel SIGTERM the child; stopping its own children is then its job.
        wait_until(lambda: gone(child), what="child to exit after the supervisor died")
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()
        if (tmp_path / "pids").exists():
            for pid in read_pids(tmp_path / "pids"):
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)
