"""Supervise the processes of `llmos up`: start them, restart them with backoff, stop whole process trees.

Design notes:
- Every spawned child gets its own session (start_new_session=True), so a terminal's Ctrl-C reaches only
  the supervisor, which then stops children in a controlled order, and so a child's whole tree can be
  signalled at once with killpg.
- Children get PR_SET_PDEATHSIG (Linux): if the supervisor is SIGKILLed it cannot run any cleanup, and
  children in their own sessions would otherwise live on as orphans. The kernel tracks the *thread* that
  forked, so children must be spawned from a long-lived thread (the main thread here).
- Processes are "dead" when no non-zombie member of their group remains and every descendant seen at stop
  time is gone: PID 1 in containers often never reaps orphans, so zombies must not count as alive.
- Adopted processes (the embedded Postgres and Redis) are stopped after all spawned children, so servers
  outlive their clients. They are restarted only when adopt() is given a factory; by default they are
  stop-only, because a restarted server must come back on the same port and the caller knows how.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import psutil

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_POLL_INTERVAL = 0.05
_KILL_WAIT = 5.0


def _load_prctl() -> Callable[..., int] | None:
    """Return libc's prctl on Linux, None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()


def parent_death_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """Return a Popen preexec_fn that asks the kernel to send `sig` to the child when its parent dies."""
    if _PRCTL is None:
        return None
    prctl = _PRCTL
    signum = int(sig)
    parent = os.getpid()

    def _preexec() -> None:
        # Runs after fork and after Popen's setuid, which would otherwise clear the setting again.
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        # The parent may have died before prctl ran, in which case no signal would ever arrive.
        if os.getppid() != parent:
            os._exit(1)

    return _preexec


def _describe_exit(code: int | None) -> str:
    """Human-readable exit status: 'exit code 3' or 'killed by SIGKILL'."""
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"killed by signal {-code} (exit code {code})"
    return f"exit code {code}"


def _group_members(pgid: int) -> list[psutil.Process]:
    """Non-zombie processes whose process group is `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    members: list[psutil.Process] = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def _live(procs: Sequence[psutil.Process]) -> list[psutil.Process]:
    """The processes of `procs` that still run (pid reuse is ruled out by psutil's create-time check)."""
    alive: list[psutil.Process] = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Poll until none of `procs` runs (zombies count as gone) or `timeout` passes; return survivors."""
    deadline = time.monotonic() + timeout
    alive = _live(procs)
    while alive and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL)
        alive = _live(alive)
    return alive


def _descendants(pid: int) -> list[psutil.Process]:
    """All descendants of `pid`, empty when it is gone."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _own_group(pid: int) -> int | None:
    """The process group of `pid` if it leads its own group distinct from ours, else None."""
    try:
        pgid = os.getpgid(pid)
    except OSError:
        return None
    return pgid if pgid == pid and pgid != os.getpgrp() else None


@dataclass
class _Stopping:
    """A process being stopped, with what must be gone before it counts as stopped."""

    popen: subprocess.Popen[bytes]
    pgid: int | None
    tree: list[psutil.Process]


def _begin_stop(
    popen: subprocess.Popen[bytes], pgid: int | None, sig: int, whole_group: bool
) -> _Stopping:
    """Snapshot the process tree, then send `sig` to the leader or to its whole group."""
    # Snapshot first: descendants that called setsid() left the group and are only reachable this way.
    tree = _descendants(popen.pid) if popen.poll() is None else []
    try:
        if whole_group and pgid is not None:
            os.killpg(pgid, sig)
        elif popen.poll() is None:
            popen.send_signal(sig)
    except ProcessLookupError:
        pass
    return _Stopping(popen, pgid, tree)


def _is_alive(stopping: _Stopping) -> bool:
    """True while the leader, a member of its group, or a snapshotted descendant still runs."""
    if stopping.popen.poll() is None:
        return True
    if stopping.pgid is not None and _group_members(stopping.pgid):
        return True
    return bool(_live(stopping.tree))


def _kill(stopping: _Stopping) -> None:
    """SIGKILL the leader, its group and every snapshotted descendant."""
    if stopping.pgid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stopping.pgid, signal.SIGKILL)
    if stopping.popen.poll() is None:
        stopping.popen.kill()
    for proc in _live(stopping.tree):
        try:
            proc.kill()
        except psutil.Error:
            continue


def _finish_stop(stoppings: Sequence[_Stopping], timeout: float, label: str) -> None:
    """Wait up to `timeout` for all to exit, then SIGKILL what is left and wait for that too."""
    deadline = time.monotonic() + timeout
    pending = [s for s in stoppings if _is_alive(s)]
    while pending and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL)
        pending = [s for s in pending if _is_alive(s)]
    if not pending:
        return
    logger.warning(
        "%s: %d process tree(s) ignored the stop signal for %.0fs; killing", label, len(pending), timeout
    )
    for stopping in pending:
        _kill(stopping)
    deadline = time.monotonic() + _KILL_WAIT
    while pending and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL)
        pending = [s for s in pending if _is_alive(s)]
    for stopping in pending:
        logger.error("%s: pid %d (or its children) survived SIGKILL", label, stopping.popen.pid)


def stop_process(
    popen: subprocess.Popen[bytes],
    sig: int = signal.SIGTERM,
    timeout: float = 20.0,
    whole_group: bool = False,
) -> None:
    """Send `sig` (to the group if `whole_group`), wait up to `timeout`, then SIGKILL the whole tree."""
    stopping = _begin_stop(popen, _own_group(popen.pid) if popen.poll() is None else None, sig, whole_group)
    _finish_stop([stopping], timeout, f"pid {popen.pid}")


@dataclass
class ChildSpec:
    """How to run one supervised child process."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None  # overlaid on the supervisor's environment
    cwd: Path | None = None


@dataclass
class _Child:
    """Runtime state of one supervised process."""

    name: str
    spawn: Callable[[], subprocess.Popen[bytes]] | None  # None: stop-only
    stop_signal: int
    adopted: bool
    backoff: float
    popen: subprocess.Popen[bytes] | None = None
    pgid: int | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    restarts: int = 0
    exit_reported: bool = False
    history: list[float] = field(default_factory=list)


class Supervisor:
    """Start, watch, restart and stop a set of child processes."""

    def __init__(
        self,
        log_dir: Path,
        *,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        stable_after: float = 60.0,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self._children: list[_Child] = []
        self._started = False
        self._stopped = False

    # -- registration -------------------------------------------------------------------------------

    def add(self, spec: ChildSpec) -> None:
        """Register a child; it is launched by start(), or at once if start() already ran."""
        self._check_name(spec.name)
        child = _Child(
            name=spec.name,
            spawn=lambda: self._spawn(spec),
            stop_signal=signal.SIGTERM,
            adopted=False,
            backoff=self.backoff_initial,
        )
        self._children.append(child)
        if self._started and not self._stopped:
            self._launch(child)

    def adopt(
        self,
        name: str,
        popen: subprocess.Popen[bytes],
        *,
        stop_signal: int = signal.SIGTERM,
        restart: Callable[[], subprocess.Popen[bytes]] | None = None,
    ) -> None:
        """Supervise a running process: stopped after spawned children, restarted only via `restart`."""
        self._check_name(name)
        child = _Child(
            name=name,
            spawn=restart,
            stop_signal=stop_signal,
            adopted=True,
            backoff=self.backoff_initial,
            popen=popen,
            pgid=_own_group(popen.pid),
            started_at=time.monotonic(),
        )
        child.history.append(child.started_at)
        self._children.append(child)

    def _check_name(self, name: str) -> None:
        if any(child.name == name for child in self._children):
            raise ValueError(f"duplicate child name {name!r}")

    # -- introspection ------------------------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        """PID of the named child while it runs, else None."""
        child = self._child(name)
        if child.popen is None or child.popen.poll() is not None:
            return None
        return child.popen.pid

    def restart_count(self, name: str) -> int:
        """How many times the named child has been restarted."""
        return self._child(name).restarts

    def restart_times(self, name: str) -> list[float]:
        """time.monotonic() of each (re)start of the named child."""
        return list(self._child(name).history)

    def _child(self, name: str) -> _Child:
        for child in self._children:
            if child.name == name:
                return child
        raise KeyError(name)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Launch every registered child that is not running yet."""
        if self._started:
            return
        self._started = True
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for child in self._children:
            if child.popen is None:
                self._launch(child)

    def _spawn(self, spec: ChildSpec) -> subprocess.Popen[bytes]:
        """Start one child in its own session with output appended to log_dir/NAME.log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Unbuffered Python output so logs are readable live and not lost on SIGKILL.
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(spec.env or {})
        with open(self.log_dir / f"{spec.name}.log", "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} starting {spec.name}: {' '.join(spec.argv)}\n".encode())
            log.flush()
            return subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=spec.cwd,
                env=env,
                start_new_session=True,
                preexec_fn=parent_death_preexec(signal.SIGTERM),
            )

    def _launch(self, child: _Child) -> None:
        """(Re)start a child through its spawn callable and record when."""
        assert child.spawn is not None
        child.popen = child.spawn()
        child.pgid = child.popen.pid if not child.adopted else _own_group(child.popen.pid)
        child.started_at = time.monotonic()
        child.history.append(child.started_at)
        child.restart_at = None
        child.exit_reported = False
        logger.info("started %s (pid %d)", child.name, child.popen.pid)

    def poll(self) -> None:
        """Notice children that exited and restart them once their backoff delay has passed."""
        if self._stopped:
            return
        now = time.monotonic()
        for child in self._children:
            if child.popen is None:
                continue
            code = child.popen.poll()
            if code is None:
                continue
            if child.restart_at is None and not child.exit_reported:
                self._on_exit(child, code, now)
            if child.restart_at is not None and now >= child.restart_at:
                try:
                    self._launch(child)
                except Exception:
                    logger.exception("could not restart %s; retrying in %.1fs", child.name, child.backoff)
                    child.restart_at = now + child.backoff
                    child.backoff = min(child.backoff * 2, self.backoff_max)
                else:
                    child.restarts += 1

    def _on_exit(self, child: _Child, code: int, now: float) -> None:
        """Clean up after a dead child and schedule its restart."""
        child.exit_reported = True
        assert child.popen is not None
        # A dead leader's orphans would run on unsupervised; the group dies with its leader.
        if child.pgid is not None:
            leftovers = _group_members(child.pgid)
            if leftovers:
                logger.warning("%s: killing %d leftover process(es) of its group", child.name, len(leftovers))
                for proc in leftovers:
                    try:
                        proc.kill()
                    except psutil.Error:
                        continue
        if child.spawn is None:
            logger.error("%s (pid %d) exited with %s; not restartable", child.name, child.popen.pid,
                         _describe_exit(code))
            return
        if now - child.started_at >= self.stable_after:
            child.backoff = self.backoff_initial
        delay = child.backoff
        child.backoff = min(child.backoff * 2, self.backoff_max)
        child.restart_at = now + delay
        logger.warning("%s (pid %d) exited with %s; restarting in %.1fs", child.name, child.popen.pid,
                       _describe_exit(code), delay)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop spawned children (whole groups, reverse order), then adopted ones; SIGKILL on timeout."""
        if self._stopped:
            return
        self._stopped = True
        spawned = [c for c in reversed(self._children) if not c.adopted]
        adopted = [c for c in reversed(self._children) if c.adopted]
        # Clients first, servers last: workers must not see their database vanish mid-shutdown.
        for phase, children in (("children", spawned), ("servers", adopted)):
            stoppings: list[_Stopping] = []
            for child in children:
                if child.popen is None:
                    continue
                logger.info("stopping %s (pid %d)", child.name, child.popen.pid)
                # Adopted servers shut down their own workers; signalling those directly would abort them.
                stoppings.append(_begin_stop(child.popen, child.pgid, child.stop_signal, not child.adopted))
            _finish_stop(stoppings, timeout, f"supervisor {phase}")

    def run_until_signal(self, extra_servers_stop: Callable[[], None] | None = None) -> None:
        """Start, poll until SIGINT/SIGTERM/SIGHUP, then stop children and finally `extra_servers_stop`."""
        stop_requested = threading.Event()
        received: list[int] = []

        def _handler(signum: int, frame: FrameType | None) -> None:
            # No logging here: the handler may interrupt code that holds the logging lock.
            received.append(signum)
            stop_requested.set()

        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, _handler) for sig in handled}
        try:
            self.start()
            while not stop_requested.wait(0.5):
                self.poll()
            logger.info("received %s; stopping", signal.Signals(received[0]).name)
        finally:
            try:
                self.stop()
            finally:
                try:
                    if extra_servers_stop is not None:
                        extra_servers_stop()
                finally:
                    # Restored last so a second Ctrl-C cannot interrupt the shutdown halfway.
                    for sig, old in previous.items():
                        signal.signal(sig, old)
