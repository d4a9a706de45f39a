"""Start-up steps shared by `llmos up`, `llmos migrate` and the tests: wait for the DB, migrate, seed."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from core.settings import get_settings
from db.session import get_engine, transaction
from domain import keys, models

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
BASE_SCOPES = ("files", "fine_tuning", "batches", "inference", "webhooks")


def alembic_config() -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "db" / "migrations"))
    return config


def wait_for_database(timeout: float = 60.0) -> None:
    """Poll until Postgres accepts a query; raise with the last error at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with get_engine().connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"database not reachable after {timeout:.0f}s: {exc}") from exc
            time.sleep(0.5)


def migrate() -> None:
    """Bring the schema to the newest revision (idempotent); concurrent callers serialise on a lock."""
    wait_for_database()
    with get_engine().begin() as conn:
        # An advisory lock keeps two starting processes from running the same migration at once.
        conn.execute(text("SELECT pg_advisory_xact_lock(7301001)"))
        config = alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def register_base_models(models_dir: Path) -> list[str]:
    """Build the offline base models if missing and upsert every base model into the registry."""
    from training.base_models import ensure_base_models

    infos = ensure_base_models(models_dir, convert_gguf_models=get_settings().convert_gguf_models)
    with transaction() as session:
        for info in infos:
            models.register_base_model(session, name=info.name, path=str(info.path), tasks=list(info.tasks),
                                       architecture=info.architecture, description=info.description)
    return [info.name for info in infos]


def create_key(tenant_name: str, scopes: list[str]) -> tuple[str, str, list[str]]:
    """Create a key for a tenant (created on first use); returns (key id, plaintext, scopes)."""
    with transaction() as session:
        created = keys.create_key(session, tenant=tenant_name, scopes=scopes)
    return created["id"], created["key"], created["scopes"]


def tenant_has_keys(tenant_name: str) -> bool:
    with transaction() as session:
        return keys.tenant_has_keys(session, tenant=tenant_name)
