"""The tenant's own limits and usage (extension)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from api import objects
from api.boundary import read
from api.deps import Principal, authenticate
from domain import tenants

router = APIRouter(prefix="/v1/limits", tags=["limits"])


@router.get("", summary="This tenant's rate limits, quotas and usage", response_model=objects.Limits)
async def get_limits(principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    return await read(tenants.get_limits, tenant_id=principal.tenant_id)
