"""One deployment on one machine, defined once: its processes and the servers they need.

`llmos up` supervises these processes; the tests and the benchmarks start the same ones with the same
commands, so what they measure and check is what users run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ops.embedded import EmbeddedServer

# Every process of a deployment, by role: the `llmos` command that runs it.
ROLES: dict[str, tuple[str, ...]] = {
    "api": ("api",),
    "worker-gpu": ("worker", "--queues", "gpu"),
    "worker-inference": ("worker", "--queues", "inference"),
    "worker-cpu": ("worker", "--queues", "cpu"),
    "worker-webhooks": ("worker", "--queues", "webhooks"),
    "beat": ("beat",),
    "flower": ("flower",),
}
# What `llmos up` runs; the tests and benchmarks leave Flower out.
ALL = tuple(ROLES)
SERVICE = ("api", "worker-gpu", "worker-inference", "worker-cpu", "worker-webhooks", "beat")


def llmos(*args: str) -> list[str]:
    """An `llmos` command on this interpreter and code, whatever PATH says."""
    return [sys.executable, "-m", "ops.cli", *args]


def argv(role: str) -> list[str]:
    """The command of one role."""
    return llmos(*ROLES[role])


@dataclass
class Servers:
    """The Postgres and broker URLs a deployment uses, and the embedded servers started for them."""

    database_url: str
    broker_url: str
    embedded: list[EmbeddedServer] = field(default_factory=list)

    def stop(self) -> None:
        from ops.embedded import stop_server

        for server in reversed(self.embedded):
            stop_server(server)
        self.embedded.clear()


def start_servers(data_dir: Path, database_url: str | None, broker_url: str | None,
                  log_dir: Path | None = None) -> Servers:
    """Embedded Postgres and Redis under ``data_dir`` for whichever URL is not given; nothing left on failure."""
    from ops.embedded import start_postgres, start_redis

    started: list[EmbeddedServer] = []
    servers = Servers(database_url or "", broker_url or "", started)
    try:
        if not database_url:
            pg = start_postgres(data_dir / "postgres", log_path=log_dir / "postgres.log" if log_dir else None)
            started.append(pg)
            servers.database_url = pg.url
        if not broker_url:
            rd = start_redis(data_dir / "redis", log_path=log_dir / "redis.log" if log_dir else None)
            started.append(rd)
            servers.broker_url = rd.url
    except BaseException:
        servers.stop()
        raise
    return servers
