"""Secrets at rest: webhook signing secrets are stored sealed (encrypted and authenticated) with a key from
settings, so a copy of the database or a backup alone does not let anyone sign as the service.

`LLMOS_SECRET_KEY` holds one or more keys, comma-separated, each a passphrase of at least 16 characters:
the first seals, every one of them opens. To rotate, put the new key first and keep the old one after it,
run `llmos secrets rotate` (re-seals every stored secret with the new key), then drop the old key. Without
the setting (development), a key is generated into `HOME/run/secret_key`, readable by its owner only.

Sealed values read `enc:v1:<Fernet token>` (AES-128-CBC with HMAC-SHA256, from `cryptography`); a value
without the prefix is a secret stored before sealing existed, returned as it is until `rotate` seals it.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from core.settings import get_settings

PREFIX = "enc:v1:"


class SealError(Exception):
    """A sealed value no configured key opens (the key it was sealed with is gone from LLMOS_SECRET_KEY)."""


def _fernet(passphrase: str) -> Fernet:
    # Any passphrase becomes a 32-byte Fernet key; the passphrases are long random strings, not passwords.
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(passphrase.encode()).digest()))


@lru_cache(maxsize=4)
def _keys(configured: str) -> MultiFernet:
    return MultiFernet([_fernet(k.strip()) for k in configured.split(",") if k.strip()])


def _current() -> MultiFernet:
    return _keys(get_settings().resolved_secret_key())


def seal(plain: str) -> str:
    return PREFIX + _current().encrypt(plain.encode()).decode()


def unseal(stored: str) -> str:
    if not stored.startswith(PREFIX):
        return stored
    try:
        return _current().decrypt(stored.removeprefix(PREFIX).encode()).decode()
    except InvalidToken:
        raise SealError("a stored secret cannot be opened with any key in LLMOS_SECRET_KEY") from None


def reseal(stored: str) -> str:
    """The value sealed with the first key (plain values get sealed too)."""
    return seal(unseal(stored))
