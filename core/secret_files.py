"""Secrets generated once into files of their own, which every process of a deployment agrees on."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def generated_secret(path: Path, nbytes: int) -> str:
    """The secret in ``path`` (mode 0600), made by whichever process asks first.

    Every process may get here at once and all must agree: the secret is written whole to a file of its own,
    then linked into place, which only the first process succeeds at.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_urlsafe(nbytes))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()
