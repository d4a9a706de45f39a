"""List responses in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Query

from api.errors import APIError
from db.pagination import Page

T = TypeVar("T")

Limit = Query(20, ge=1, le=100, description="Items per page (1-100).")
After = Query(None, max_length=128, description="Return the items after this ID, newest first.")


def page_body(page: Page[T] | None, render: Callable[[T], dict[str, Any]], after: str | None) -> dict[str, Any]:
    if page is None:
        raise APIError(400, f"'after' names no item of this list: {after}", param="after",
                       code="invalid_cursor")
    return {"object": "list", "data": [render(item) for item in page.items], "has_more": page.has_more}
