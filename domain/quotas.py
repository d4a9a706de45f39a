"""Per-tenant limits in force, and the quota check each creating service runs in its transaction.

A tenant's own value of a limit is NULL until an operator sets it, and until then follows the
`LLMOS_DEFAULT_*` setting; 0 means unlimited (``null`` to clients). A quota is checked with the tenant's row
locked until the creating transaction ends, so concurrent creations take the last slot one at a time.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from core.errors import ServiceError
from core.settings import get_settings
from db import tenants as tenants_repo

# Every limit a tenant has, in the order `llmos tenants show` prints them.
LIMITS = ("rpm", "tpm", "max_active_jobs", "max_storage_bytes", "max_webhook_endpoints", "max_active_batches")
# A refused creation may fit once something finishes; clients that honour Retry-After try again then.
RETRY_AFTER_SECONDS = 30


def effective(own: int | None, name: str) -> int | None:
    """The limit in force: the tenant's own value or the default; None when unlimited."""
    value: int = getattr(get_settings(), f"default_{name}") if own is None else own
    return value or None


def take(session: Session, tenant_id: str, quota: str, used: Callable[[], int], amount: int = 1) -> None:
    """Refuse (429 ``quota_exceeded``) unless ``amount`` more of ``quota`` fits; call before adding the object.

    ``used`` counts the current usage; it runs after the tenant's row is locked, so it sees every creation
    that committed before this one.
    """
    tenant = tenants_repo.lock_tenant(session, tenant_id)
    limit = effective(getattr(tenant, quota), quota)
    if limit is None:
        return
    now = used()
    if now + amount > limit:
        what = f"{now} stored, {amount} more asked" if quota == "max_storage_bytes" else f"{now} in use"
        raise ServiceError(
            429, f"Quota exceeded: {quota} is {limit} ({what}). Finish or delete some, or ask an operator to "
                 "raise it.", type_="insufficient_quota", code="quota_exceeded", param=quota,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
