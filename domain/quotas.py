"""Per-tenant limits in force, and the quota check each creating service runs in its transaction.

A tenant's own value of a limit is NULL until an operator sets it, and until then follows the
`LLMOS_DEFAULT_*` setting; 0 means unlimited (``null`` to clients). A quota is checked last in the creating
transaction, with the tenant's row locked until it ends, so concurrent creations take the last slot one at
a time.
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


def take(session: Session, tenant_id: str, quota: str, used: Callable[[int], int], amount: int = 1) -> None:
    """Refuse (429 ``quota_exceeded``) when the object just added, ``amount`` of ``quota``, does not fit.

    Call it after adding and flushing the object, as the service's last statement: ``used`` then counts the
    object too, and runs after the tenant's row is locked, so it sees every creation that committed before
    this one. It is given the count that already refuses (limit + 1) and need not count further.

    Taken last, the lock is held for the count and the caller's commit only: concurrent creations of one
    tenant queue for that moment, not for each other's whole transactions. The lock is ``FOR NO KEY
    UPDATE``: the new row's foreign key already holds a key-share lock on the tenant, which a plain
    ``FOR UPDATE`` would conflict with (two creations would deadlock).
    """
    tenant = tenants_repo.lock_tenant(session, tenant_id)
    limit = effective(getattr(tenant, quota), quota)
    if limit is None:
        return
    now = used(limit + 1)
    if now > limit:
        before = now - amount
        what = f"{before} stored, {amount} more asked" if quota == "max_storage_bytes" else f"{before} in use"
        raise ServiceError(
            429, f"Quota exceeded: {quota} is {limit} ({what}). Finish or delete some, or ask an operator to "
                 "raise it.", type_="insufficient_quota", code="quota_exceeded", param=quota,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
