"""Deployment settings: HTTPS only with HSTS, no secret on a command line, production refuses weak settings."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from pydantic import ValidationError

from core.settings import Settings
from tests.conftest import ROOT, free_port, wait_until

SAFE = {"env": "production", "flower_password": "a-long-random-flower-secret", "webhook_allow_private": False,
        "api_host": "127.0.0.1", "tls_certfile": None, "tls_keyfile": None,
        "secret_key": "a-long-random-sealing-key", "metrics_token": None}


@pytest.mark.parametrize(("change", "named"), [
    ({"flower_password": "short"}, "LLMOS_FLOWER_PASSWORD"),
    ({"flower_password": "admin"}, "LLMOS_FLOWER_PASSWORD"),
    ({"webhook_allow_private": True}, "LLMOS_WEBHOOK_ALLOW_PRIVATE"),
    ({"api_host": "0.0.0.0"}, "LLMOS_API_HOST"),
    ({"tls_certfile": Path("/etc/cert.pem")}, "LLMOS_TLS_KEYFILE"),
    ({"secret_key": None}, "LLMOS_SECRET_KEY"),
    ({"secret_key": "a-long-random-sealing-key,short"}, "LLMOS_SECRET_KEY"),
    ({"metrics_token": "short"}, "LLMOS_METRICS_TOKEN"),
])
def test_production_refuses_weak_settings(change: dict[str, object], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        Settings(**{**SAFE, **change})  # type: ignore[arg-type]


def test_production_accepts_a_public_address_with_tls_or_behind_a_tls_proxy() -> None:
    settings = Settings(**{**SAFE, "api_host": "0.0.0.0", "tls_certfile": Path("c.pem"),  # type: ignore[arg-type]
                           "tls_keyfile": Path("k.pem")})
    assert settings.tls_enabled
    assert Settings(**{**SAFE, "api_host": "0.0.0.0", "behind_tls_proxy": True}).api_host  # type: ignore[arg-type]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    return cert, key


@contextmanager
def _running(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-m", "ops.cli", *argv], cwd=ROOT, env={**os.environ, **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield process
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)


def test_the_api_serves_https_only_with_hsts(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    trusted = ssl.create_default_context(cafile=str(cert))
    port = free_port()
    env = {"LLMOS_TLS_CERTFILE": str(cert), "LLMOS_TLS_KEYFILE": str(key), "LLMOS_API_PORT": str(port),
           "LLMOS_HOME": str(tmp_path / "home"), "LLMOS_DATABASE_URL": "postgresql://127.0.0.1:1/none",
           "LLMOS_BROKER_URL": "redis://127.0.0.1:1/0"}

    def https_up() -> httpx.Response | None:
        try:
            return httpx.get(f"https://127.0.0.1:{port}/healthz", verify=trusted, timeout=2)
        except httpx.HTTPError:
            return None

    with _running(["api", "--workers", "1"], env):
        response = wait_until(https_up, 60, "the API to answer over HTTPS")
        assert response.status_code == 200
        assert response.headers["strict-transport-security"].startswith("max-age=")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_operator_pages_need_the_metrics_token(tmp_path: Path) -> None:
    token = "operator-token-of-this-test"
    port = free_port()
    env = {"LLMOS_METRICS_TOKEN": token, "LLMOS_API_PORT": str(port), "LLMOS_HOME": str(tmp_path),
           "LLMOS_DATABASE_URL": "postgresql://127.0.0.1:1/none", "LLMOS_BROKER_URL": "redis://127.0.0.1:1/0"}
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    with _running(["api", "--workers", "1"], env):
        wait_until(up, 60, "the API to answer")
        for path in ("/metrics", "/docs", "/openapi.json"):
            refused = httpx.get(f"{base}{path}", timeout=5)
            assert refused.status_code == 401, path
            assert httpx.get(f"{base}{path}", headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
            allowed = httpx.get(f"{base}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            assert allowed.status_code == 200, path


def test_flowers_password_is_not_on_its_command_line(tmp_path: Path) -> None:
    password = "flower-secret-for-this-test"
    port = free_port()
    env = {"LLMOS_FLOWER_PASSWORD": password, "LLMOS_FLOWER_PORT": str(port), "LLMOS_HOME": str(tmp_path),
           "LLMOS_BROKER_URL": "redis://127.0.0.1:1/0", "LLMOS_DATABASE_URL": "postgresql://127.0.0.1:1/none"}

    def answers() -> int | None:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=2).status_code
        except httpx.HTTPError:
            return None

    with _running(["flower"], env) as flower:
        wait_until(answers, 60, "Flower to answer")
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 401
        authed = httpx.get(f"http://127.0.0.1:{port}/", auth=("admin", password), timeout=5)
        assert authed.status_code != 401
        lines = [" ".join(p.cmdline()) for p in [psutil.Process(flower.pid), *psutil.Process(flower.pid).children(
            recursive=True)]]
        assert lines and not any(password in line for line in lines)
