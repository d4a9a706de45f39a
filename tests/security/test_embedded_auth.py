"""The embedded Postgres and Redis of `llmos up` answer only clients that know their passwords.

Any local user can reach 127.0.0.1; before, both servers trusted whoever connected.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import psycopg2
import pytest
import redis

from ops.embedded import EmbeddedServer, cluster_dir, start_postgres, start_redis, stop_server


def _connect(port: int, password: str | None) -> None:
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="llmos",
                            password=password, connect_timeout=5)
    conn.close()


def test_postgres_refuses_clients_without_the_password(workdir: Path, servers: list[EmbeddedServer]) -> None:
    pg = start_postgres(workdir / "postgres")
    servers.append(pg)
    password_file = workdir / "postgres.password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    password = password_file.read_text().strip()
    assert len(password) >= 24

    for wrong in (None, "", "postgres", password[:-1]):
        with pytest.raises(psycopg2.OperationalError, match="password"):
            _connect(pg.port, wrong)
    _connect(pg.port, password)
    # initdb read the password from a file (beside the cluster, wherever it lives) that is gone, and no
    # process shows it.
    assert not list(cluster_dir(workdir / "postgres").parent.glob(".initdb-*"))
    server = psutil.Process(pg.process.pid)
    assert password not in " ".join(server.cmdline())
    for child in server.children():
        try:
            shown = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue  # a backend of the refused connections above, gone meanwhile
        assert password not in shown


def test_a_cluster_made_with_trust_auth_requires_the_password_from_its_next_start(
        workdir: Path, servers: list[EmbeddedServer]) -> None:
    data_dir = workdir / "postgres"
    pg = start_postgres(data_dir)
    servers.append(pg)
    stop_server(pg)
    # As clusters were made before passwords were required: anyone on 127.0.0.1 was trusted.
    hba = cluster_dir(data_dir) / "pg_hba.conf"
    hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")

    again = start_postgres(data_dir)
    servers.append(again)
    with pytest.raises(psycopg2.OperationalError, match="password"):
        _connect(again.port, None)
    _connect(again.port, (workdir / "postgres.password").read_text().strip())
    assert "trust" not in hba.read_text()


def test_redis_refuses_clients_without_the_password(workdir: Path, servers: list[EmbeddedServer]) -> None:
    rd = start_redis(workdir / "redis")
    servers.append(rd)
    password = (workdir / "redis.password").read_text().strip()
    assert (workdir / "redis.password").stat().st_mode & 0o777 == 0o600
    assert (workdir / "redis" / "redis.conf").stat().st_mode & 0o777 == 0o600

    anonymous = redis.Redis(host="127.0.0.1", port=rd.port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        anonymous.set("stolen", "1")
    anonymous.close()
    client = redis.Redis.from_url(rd.url)
    assert client.ping()
    client.close()
    assert password not in " ".join(psutil.Process(rd.process.pid).cmdline())

    # The password survives a restart: the same URL still works.
    stop_server(rd)
    again = start_redis(workdir / "redis")
    servers.append(again)
    assert again.url.split("@")[0] == rd.url.split("@")[0]
