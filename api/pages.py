"""Query parameters of every list route: `limit` and `after`."""

from __future__ import annotations

from fastapi import Query

Limit = Query(20, ge=1, le=100, description="Items per page (1-100).")
After = Query(None, max_length=128, description="Return the items after this ID, newest first.")
