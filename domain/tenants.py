"""The tenants service: limits, quotas and their usage.

Each service checks its own quota where it creates the object (`domain.quotas.take`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core.errors import ServiceError, not_found
from db import tenants as tenants_repo
from db.models import Tenant
from domain import audit, batches, jobs
from domain.quotas import LIMITS, effective

__all__ = ["LIMITS", "get_limits", "list_tenants", "set_limits", "show_tenant"]


def weight_of(tenant: Tenant) -> float:
    return tenant.weight if tenant.weight is not None else 1.0


def usage(session: Session, tenant_id: str) -> dict[str, int]:
    """What the tenant uses of each quota now."""
    return {
        "active_jobs": tenants_repo.count_jobs(session, tenant_id, jobs.ACTIVE),
        "storage_bytes": tenants_repo.stored_bytes(session, tenant_id),
        "webhook_endpoints": tenants_repo.count_webhook_endpoints(session, tenant_id),
        "active_batches": tenants_repo.count_batches(session, tenant_id, batches.ACTIVE),
    }


def limits_object(session: Session, tenant: Tenant) -> dict[str, Any]:
    """`GET /v1/limits`: each limit in force (null: unlimited) beside its usage."""
    used = usage(session, tenant.id)
    return {
        "object": "limits",
        "rpm": effective(tenant.rpm, "rpm"),
        "tpm": effective(tenant.tpm, "tpm"),
        "max_active_jobs": effective(tenant.max_active_jobs, "max_active_jobs"),
        "active_jobs": used["active_jobs"],
        "max_storage_bytes": effective(tenant.max_storage_bytes, "max_storage_bytes"),
        "storage_bytes": used["storage_bytes"],
        "max_webhook_endpoints": effective(tenant.max_webhook_endpoints, "max_webhook_endpoints"),
        "webhook_endpoints": used["webhook_endpoints"],
        "max_active_batches": effective(tenant.max_active_batches, "max_active_batches"),
        "active_batches": used["active_batches"],
        "weight": weight_of(tenant),
    }


def get_limits(session: Session, *, tenant_id: str) -> dict[str, Any]:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise not_found("tenant", tenant_id)
    return limits_object(session, tenant)


def tenant_object(session: Session, tenant: Tenant) -> dict[str, Any]:
    """A tenant for operators: its limits in force, which of them are its own, and its usage."""
    own = {name: getattr(tenant, name) for name in LIMITS}
    return {"id": tenant.id, "name": tenant.name, **limits_object(session, tenant), "object": "tenant",
            "defaults": sorted(name for name, value in own.items() if value is None)}


def list_tenants(session: Session) -> list[dict[str, Any]]:
    return [tenant_object(session, tenant) for tenant in tenants_repo.list_tenants(session)]


def show_tenant(session: Session, *, name: str) -> dict[str, Any]:
    tenant = tenants_repo.get_tenant(session, name)
    if tenant is None:
        raise not_found("tenant", name)
    return tenant_object(session, tenant)


def set_limits(session: Session, *, name: str, weight: float | None = None, actor: str = "system",
               **limits: int | None) -> dict[str, Any]:
    """Set the given limits of an existing tenant (0: unlimited); the API applies them within its key cache time."""
    tenant = tenants_repo.get_tenant(session, name)
    if tenant is None:
        raise not_found("tenant", name)
    for limit, value in limits.items():
        if limit not in LIMITS:
            raise ServiceError(400, f"{limit}: not a tenant limit (one of {', '.join(LIMITS)})", param=limit)
        if value is None:
            continue
        if value < 0:
            raise ServiceError(400, f"{limit}: must be 0 (unlimited) or more, not {value}", param=limit)
        setattr(tenant, limit, value)
    if weight is not None:
        if not weight > 0:
            raise ServiceError(400, f"weight: must be above 0, not {weight}", param="weight")
        tenant.weight = weight
    session.flush()
    changed = {k: v for k, v in {**limits, "weight": weight}.items() if v is not None}
    audit.record(session, actor=actor, action="tenant.limits_set", target=name, details=changed)
    return tenant_object(session, tenant)
