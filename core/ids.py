"""Opaque, prefixed, unguessable identifiers."""

from __future__ import annotations

import secrets

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def random_token(length: int = 24) -> str:
    """A URL-safe random string of letters and digits (~143 bits at 24 chars)."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_id(prefix: str) -> str:
    """An ID like ``file-…``, ``ftjob-…`` or ``evt_…``; the prefix carries its own separator."""
    return f"{prefix}{random_token()}"


FILE = "file-"
JOB = "ftjob-"
JOB_EVENT = "ftevent-"
CHECKPOINT = "ftckpt-"
EVENT = "evt_"
KEY = "key_"
TENANT = "tenant_"
INFERENCE = "inf_"
WEBHOOK_ENDPOINT = "we_"
BATCH = "batch_"
BATCH_REQUEST = "batch_req_"
