"""Artifacts under LLMOS_HOME: uploaded files, job checkpoints, fine-tuned models."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from core.settings import get_settings


class TooLarge(Exception):
    """The upload passed the size cap; nothing was kept."""


class NotUtf8(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(f"line {line}: not valid UTF-8")
        self.line = line


def file_path(tenant_id: str, file_id: str) -> Path:
    return get_settings().files_dir / tenant_id / file_id


def job_dir(job_id: str) -> Path:
    return get_settings().artifacts_dir / "jobs" / job_id


def store_upload(chunks: Iterable[bytes], dest: Path, max_bytes: int) -> tuple[int, str]:
    """Stream chunks to ``dest`` atomically, checking size and UTF-8; returns (bytes, sha256)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    digest = hashlib.sha256()
    size = 0
    line = 1
    decoder = _Utf8Checker()
    try:
        with tmp.open("wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"file exceeds the {max_bytes} byte limit")
                if not decoder.feed(chunk):
                    raise NotUtf8(line + decoder.newlines)
                line += decoder.take_newlines()
                digest.update(chunk)
                out.write(chunk)
            if not decoder.finish():
                raise NotUtf8(line)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class _Utf8Checker:
    """Incremental UTF-8 validation that tracks newlines, so an error names its line."""

    def __init__(self) -> None:
        import codecs

        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.newlines = 0

    def feed(self, chunk: bytes) -> bool:
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            self.newlines += chunk[: exc.start].count(b"\n")
            return False
        self.newlines += text.count("\n")
        return True

    def take_newlines(self) -> int:
        n, self.newlines = self.newlines, 0
        return n

    def finish(self) -> bool:
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
        return True
