"""Opaque, prefixed, unguessable identifiers."""

from __future__ import annotations

import secrets

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


# Random bytes below this map evenly onto the 62 letters and digits (4 x 62); the rest are dropped, so every
# character is uniform.
_EVEN_BELOW = 4 * len(_ALPHABET)


def random_token(length: int = 24) -> str:
    """A URL-safe random string of letters and digits (~143 bits at 24 chars).

    One read of the OS's random source per token, not one per character: a job creation makes several IDs,
    and `secrets.choice` per character showed up in the API's profile.
    """
    chars: list[str] = []
    while len(chars) < length:
        chars.extend(_ALPHABET[b % len(_ALPHABET)] for b in secrets.token_bytes(length + 8) if b < _EVEN_BELOW)
    return "".join(chars[:length])


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
