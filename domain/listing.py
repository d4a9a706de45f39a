"""Lists in OpenAI's shape, for every service that pages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.errors import ServiceError
from db.pagination import Page


def page(found: Page[Any] | None, render: Callable[[Any], dict[str, Any]], after: str | None) -> dict[str, Any]:
    """The page's items rendered; an ``after`` that names nothing in the list is the client's error."""
    if found is None:
        raise ServiceError(400, f"'after' names no item of this list: {after}", param="after",
                           code="invalid_cursor")
    return {"object": "list", "data": [render(item) for item in found.items], "has_more": found.has_more}
