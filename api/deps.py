"""Request dependencies: a database session and the authenticated principal."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import APIError
from db import tenants
from db.session import session_factory

SCOPES = ("files", "fine_tuning", "batches", "inference", "webhooks", "admin")


def get_session() -> Iterator[Session]:
    """A session per request; handlers commit at their end, anything uncommitted is rolled back."""
    session = session_factory()()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    tenant_name: str
    key_id: str
    scopes: frozenset[str]


def authenticate(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                       type_="authentication_error", code="missing_api_key")
    found = tenants.find_active_key(token.strip())
    if found is None:
        raise APIError(401, "Invalid or revoked API key.", type_="authentication_error",
                       code="invalid_api_key")
    return Principal(tenant_id=found.tenant_id, tenant_name=found.tenant_name, key_id=found.key_id,
                     scopes=frozenset(found.scopes))


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that authenticates and demands ``scope`` (``admin`` holds every scope)."""

    # async: a set lookup needs no thread, and FastAPI runs sync dependencies each on a threadpool hop.
    async def dependency(principal: Principal = Depends(authenticate)) -> Principal:
        if scope not in principal.scopes and "admin" not in principal.scopes:
            raise APIError(403, f"This key lacks the '{scope}' scope.", type_="permission_error",
                           code="missing_scope")
        return principal

    return dependency
