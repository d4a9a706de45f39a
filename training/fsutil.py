"""Small filesystem helpers that never leave a half-written file or directory behind."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path


def replace_dir(new: Path, final: Path) -> None:
    """Move the finished directory `new` to `final`, replacing any existing `final`."""
    if final.exists():
        # rename() cannot replace a non-empty directory, so swap the old one aside first.
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(final)


def temp_dir_beside(final: Path) -> Path:
    """Create an empty hidden directory next to `final` (same filesystem, so rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and an atomic replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
