"""`llmos up`: the whole system on one machine, as supervised child processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import httpx

from core.settings import Settings, get_settings
from ops import stack
from ops.supervisor import ChildSpec, Supervisor

log = logging.getLogger("llmos.up")
ADMIN_TENANT = "default"


def _write_state(settings: Settings, state: dict[str, str]) -> None:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.embedded_state_file.with_suffix(".tmp")
    # The URLs carry the servers' passwords: 0600 whatever the umask of whoever runs this.
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(state))
    tmp.chmod(0o600)
    tmp.replace(settings.embedded_state_file)


def run_up() -> None:
    """Start servers, migrate, seed, run every process until SIGINT/SIGTERM, then stop them all."""
    settings = get_settings()
    # Everything this deployment writes under LLMOS_HOME (and every child it starts) is its owner's alone:
    # the database, the models, the uploaded files, the generated passwords and secrets.
    os.umask(0o077)
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Until the supervisor takes over signals, SIGTERM unwinds like Ctrl-C so nothing is left running.
    signal.signal(signal.SIGTERM, _interrupt)
    (settings.home / "logs").mkdir(parents=True, exist_ok=True)
    servers = stack.start_servers(settings.home / "data", settings.database_url, settings.broker_url,
                                  log_dir=settings.home / "logs")

    def stop_servers() -> None:
        servers.stop()
        settings.embedded_state_file.unlink(missing_ok=True)

    try:
        database_url, broker_url = servers.database_url, servers.broker_url
        if servers.embedded:
            _write_state(settings, {"database_url": database_url, "broker_url": broker_url,
                                    "pid": str(os.getpid())})
        env = {**os.environ, "LLMOS_HOME": str(settings.home), "LLMOS_DATABASE_URL": database_url,
               "LLMOS_BROKER_URL": broker_url}
        # Migration and model building run in a child: this process stays light and free of torch.
        subprocess.run(stack.llmos("migrate"), env=env, check=True)
        admin_key = _first_admin_key(env)
    except BaseException:
        stop_servers()
        raise

    supervisor = Supervisor(settings.home / "logs")
    for role in stack.ALL:
        supervisor.add(ChildSpec(name=role, argv=stack.argv(role), env=env, cwd=Path.cwd()))
    try:
        supervisor.start()
        _wait_for_api(supervisor, f"http://{settings.api_host}:{settings.api_port}/readyz")
    except BaseException:
        supervisor.stop()
        stop_servers()
        raise
    _announce(settings, admin_key)
    supervisor.run_until_signal(stop_servers)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _announce(settings: Settings, admin_key: str | None) -> None:
    host = settings.api_host
    print(f"LLM OS is up (home {settings.home})")
    print(f"  API     http://{host}:{settings.api_port}/v1   docs http://{host}:{settings.api_port}/docs")
    where = "LLMOS_FLOWER_PASSWORD" if settings.flower_password else str(settings.run_dir / "flower_password")
    print(f"  Flower  http://{host}:{settings.flower_port}   user {settings.flower_user}, password in {where}")
    print(f"  Logs    {settings.home / 'logs'}")
    if admin_key:
        print("  Admin key (shown once; export LLMOS_API_KEY=...):")
        print(admin_key, flush=True)
    else:
        print("  The admin key was shown at first start; make more with `llmos keys create`.", flush=True)


def _wait_for_api(supervisor: Supervisor, url: str, timeout: float = 120.0) -> None:
    """Announce the system only once the API answers ready; keep restarting children meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        supervisor.poll()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    log.warning("the API did not answer %s within %.0fs; see the logs", url, timeout)


def _first_admin_key(env: dict[str, str]) -> str | None:
    """An admin key for the default tenant on first start only; keys are shown once."""
    probe = subprocess.run(
        [sys.executable, "-c",
         "from ops.bootstrap import tenant_has_keys as t; import sys; sys.exit(1 if t('default') else 0)"],
        env=env, check=False,
    )
    if probe.returncode != 0:
        return None
    out = subprocess.run(stack.llmos("keys", "create", "--tenant", ADMIN_TENANT, "--scope", "admin", "--json"),
                         env=env, check=True, capture_output=True, text=True)
    key: str = json.loads(out.stdout.strip().splitlines()[-1])["key"]
    return key
