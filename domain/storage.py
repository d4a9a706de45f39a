"""Artifacts: uploaded files, batch files, job checkpoints, fine-tuned models, and where their bytes live.

A row keeps a *location*: a local path (``LLMOS_STORAGE_URL`` unset: everything under LLMOS_HOME, as it
always was) or an ``s3://BUCKET/KEY`` URL (a directory's ends with ``/``). Code that reads calls
`materialize` for a local path (a remote object is downloaded into a bounded cache first); code that writes
writes locally and calls `publish`, which returns the location to record. Training and inference therefore
only ever see local paths.

The object store itself is an adapter (`infra.objectstore`, boto3) installed with `use_object_store`, as
the broker's publisher is: this layer never imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

from core.settings import get_settings

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
# Written last into a published directory: a directory without it (an upload cut short) is not read.
PUBLISHED_MARKER = ".published"
# In a published directory: which JSON fields of its files name another stored directory, by location (a LoRA
# model's base, when that base is itself a fine-tuned model in the bucket). A materialized copy has those
# fields pointing at this machine's copies, which are brought back whenever the directory is materialized.
REFERENCES_FILE = ".llmos-references.json"


class TooLarge(Exception):
    """The upload passed the size cap; nothing was kept."""


class NotUtf8(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(f"line {line}: not valid UTF-8")
        self.line = line


class StorageError(RuntimeError):
    """Object storage refused or could not be reached; the message names the setting to check."""


class ObjectStore(Protocol):
    """The few operations on a bucket that artifacts need; keys are full keys within ``bucket``."""

    bucket: str
    prefix: str

    def check(self) -> None:
        """Raise StorageError naming the setting at fault when the bucket cannot be used."""

    def upload(self, local: Path, key: str) -> None: ...

    def download(self, key: str, local: Path) -> None:
        """Raise FileNotFoundError when there is no such object."""

    def list_objects(self, prefix: str) -> list[tuple[str, int]]:
        """(key, bytes) of every object whose key starts with ``prefix``."""

    def delete(self, keys: list[str]) -> None: ...


_store_factory: Callable[[str, str | None], ObjectStore] | None = None
_store: ObjectStore | None = None
_store_lock = threading.Lock()


def use_object_store(factory: Callable[[str, str | None], ObjectStore]) -> None:
    """Install how this process opens ``LLMOS_STORAGE_URL`` (done by `infra.objectstore` on import)."""
    global _store_factory, _store
    _store_factory, _store = factory, None


def remote() -> bool:
    """True when artifacts live in object storage rather than under LLMOS_HOME."""
    return get_settings().storage_url is not None


def object_store() -> ObjectStore:
    """The bucket of ``LLMOS_STORAGE_URL``, opened and checked on first use."""
    global _store
    with _store_lock:
        if _store is None:
            settings = get_settings()
            if settings.storage_url is None:
                raise StorageError("LLMOS_STORAGE_URL is not set; artifacts are kept under LLMOS_HOME")
            if _store_factory is None:
                raise StorageError("LLMOS_STORAGE_URL is set, but this process installed no object store "
                                   "(import infra.objectstore)")
            store = _store_factory(settings.storage_url, settings.s3_endpoint_url)
            store.check()
            _store = store
        return _store


def check_object_store() -> None:
    """Open and check the bucket of ``LLMOS_STORAGE_URL`` without keeping the client: a process about to fork
    (a prefork worker, an API with several processes) must not hand one connection pool to its children."""
    settings = get_settings()
    if settings.storage_url is None:
        return
    if _store_factory is None:
        raise StorageError("LLMOS_STORAGE_URL is set, but this process installed no object store "
                           "(import infra.objectstore)")
    _store_factory(settings.storage_url, settings.s3_endpoint_url).check()


# --- keys and locations -------------------------------------------------------------------------------


def file_key(tenant_id: str, file_id: str) -> str:
    return f"files/{tenant_id}/{file_id}"


def job_key(job_id: str) -> str:
    return f"jobs/{job_id}"


def _local_path(key: str) -> Path:
    """Where a key's bytes live under LLMOS_HOME: the layout of every release before object storage."""
    settings = get_settings()
    if key.startswith("files/"):
        return settings.files_dir / key.removeprefix("files/")
    return settings.artifacts_dir / key


def _url(key: str, directory: bool = False) -> str:
    store = object_store()
    return f"{S3_SCHEME}{store.bucket}/{store.prefix}{key}" + ("/" if directory else "")


def _parse(location: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// location; the bucket must be the configured one."""
    bucket, _, key = location.removeprefix(S3_SCHEME).partition("/")
    store = object_store()
    if bucket != store.bucket:
        raise StorageError(f"{location} is in bucket '{bucket}', but LLMOS_STORAGE_URL names '{store.bucket}'")
    return bucket, key


def location(key: str) -> str:
    """Where a file published under ``key`` is: its URL in object storage, else its path under LLMOS_HOME."""
    return _url(key) if remote() else str(_local_path(key))


def file_path(tenant_id: str, file_id: str) -> Path:
    """Where an uploaded or result file is written on this machine: its final place under LLMOS_HOME, or a
    staging path that `publish` uploads from (and removes) when artifacts live in object storage."""
    if remote():
        return get_settings().home / "staging" / file_key(tenant_id, file_id)
    return _local_path(file_key(tenant_id, file_id))


def file_location(tenant_id: str, file_id: str) -> str:
    """The location a file's row records once `publish(file_path(...), file_key(...))` has run."""
    return location(file_key(tenant_id, file_id))


def job_dir(job_id: str) -> Path:
    """A job's working directory on this machine (checkpoints, the model, results) while it trains."""
    return _local_path(job_key(job_id))


# --- writing ------------------------------------------------------------------------------------------


def publish(local: Path, key: str) -> str:
    """Keep what was written at ``local`` (a file or a directory) under ``key``; returns its location.

    Local storage keeps it where it is (its path is the location). Object storage uploads it: a directory's
    files first and `PUBLISHED_MARKER` last, replacing whatever the key held; an uploaded file's staging copy
    is removed (a directory is left to its writer, who may still be using it).
    """
    if not remote():
        return str(local)
    store = object_store()
    full = store.prefix + key
    if local.is_dir():
        marker_key = f"{full}/{PUBLISHED_MARKER}"
        stale = {k for k, _ in store.list_objects(full + "/")}
        if marker_key in stale:
            # Replaced: readers must not take the old marker for the new files' (half uploaded) directory.
            store.delete([marker_key])
        uploaded = set()
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            name = f"{full}/{path.relative_to(local).as_posix()}"
            store.upload(path, name)
            uploaded.add(name)
        marker = Path(tempfile.mkstemp(prefix="llmos-marker-")[1])
        try:
            store.upload(marker, marker_key)
        finally:
            marker.unlink(missing_ok=True)
        store.delete(sorted(stale - uploaded - {marker_key}))
        return _url(key, directory=True)
    store.upload(local, full)
    local.unlink(missing_ok=True)
    return _url(key)


def note_reference(directory: Path, file_name: str, field: str, referenced: str) -> None:
    """Record, before ``directory`` is published, that ``field`` of the JSON file ``file_name`` in it names the
    stored directory at location ``referenced`` (`REFERENCES_FILE`)."""
    path = directory / REFERENCES_FILE
    references = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    references.setdefault(file_name, {})[field] = referenced
    path.write_text(json.dumps(references, indent=2), encoding="utf-8")


def is_stored_remotely(stored_at: str) -> bool:
    """True for a location in object storage, False for a local path."""
    return stored_at.startswith(S3_SCHEME)


def delete(location: str) -> None:
    """Remove a file or directory at ``location`` (a missing one is no error)."""
    if not is_stored_remotely(location):
        path = Path(location)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return
    _, key = _parse(location)
    store = object_store()
    if key.endswith("/"):
        store.delete(sorted(k for k, _ in store.list_objects(key)))
    else:
        store.delete([key])
    _cache().forget(location)


def delete_key(key: str) -> None:
    """Remove everything under ``key`` in object storage (no-op with local storage, whose callers remove the
    local directory themselves)."""
    if remote():
        delete(_url(key, directory=True))


# --- reading ------------------------------------------------------------------------------------------


def materialize(location: str) -> Path:
    """A local path holding the bytes at ``location``: the path itself for local storage, else a copy in this
    machine's cache (downloaded on first use). Raises FileNotFoundError when nothing is stored there."""
    if not is_stored_remotely(location):
        return Path(location)
    return _cache().get(location)


# --- checkpoints --------------------------------------------------------------------------------------


def publish_checkpoint(job_id: str, checkpoint: Path) -> str:
    """Upload a checkpoint as soon as it is written, so a worker on another machine resumes from it, and drop
    the uploaded ones the trainer has since pruned on disk."""
    if not remote():
        return str(checkpoint)
    prefix = f"{job_key(job_id)}/checkpoints"
    published = publish(checkpoint, f"{prefix}/{checkpoint.name}")
    kept = {p.name for p in checkpoint.parent.iterdir()}
    for name in _published_dirs(prefix):
        if name not in kept:
            delete_key(f"{prefix}/{name}")
    return published


def restore_checkpoint(job_id: str, checkpoint_dir: Path, step_of: Callable[[str], int | None]) -> Path | None:
    """Download the job's newest uploaded checkpoint into ``checkpoint_dir`` when this machine has none as
    recent (it never ran the job, or ran an earlier part of it); returns what it downloaded.

    ``step_of`` reads a checkpoint directory's step from its name (None: not a checkpoint), so the trainer's
    naming stays the trainer's.
    """
    if not remote():
        return None
    prefix = f"{job_key(job_id)}/checkpoints"
    uploaded = [(step, name) for name in _published_dirs(prefix) if (step := step_of(name)) is not None]
    if not uploaded:
        return None
    step, name = max(uploaded)
    local_steps = [s for p in checkpoint_dir.glob("*") if (s := step_of(p.name)) is not None] \
        if checkpoint_dir.is_dir() else []
    if local_steps and max(local_steps) >= step:
        return None
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # The trainer removes directories with this prefix left by a process that died mid-save (or mid-download).
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-checkpoint-restore-", dir=checkpoint_dir))
    try:
        _download_dir(f"{object_store().prefix}{prefix}/{name}/", tmp)
        final = checkpoint_dir / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("restored checkpoint %s of %s from object storage", name, job_id)
    return final


def _published_dirs(prefix: str) -> list[str]:
    """Names of the complete directories uploaded directly under ``prefix``."""
    store = object_store()
    full = f"{store.prefix}{prefix}/"
    names = []
    for key, _ in store.list_objects(full):
        name, _, rest = key[len(full):].partition("/")
        if rest == PUBLISHED_MARKER:
            names.append(name)
    return sorted(names)


def _download_dir(prefix: str, dest: Path) -> int:
    """Download every object under ``prefix`` (ending with /) into ``dest``; bytes downloaded. A directory
    whose upload never finished (no `PUBLISHED_MARKER`) counts as missing."""
    store = object_store()
    objects = store.list_objects(prefix)
    if not any(key == prefix + PUBLISHED_MARKER for key, _ in objects):
        raise FileNotFoundError(f"{S3_SCHEME}{store.bucket}/{prefix}")
    total = 0
    for key, size in objects:
        relative = key[len(prefix):]
        if relative == PUBLISHED_MARKER:
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        store.download(key, target)
        total += size
    return total


# --- the local cache of remote objects ----------------------------------------------------------------


class _Cache:
    """Downloaded objects under ``root``, shared by the processes of one LLMOS_HOME, at most ``max_bytes``
    together: the least recently used are evicted when a download passes the budget.

    An index file under an flock records each entry's size; an entry's last use is its mtime. Downloads run
    outside the lock (into a temp dir) so one large model does not hold up every other read.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        # Entries this process found in place, so a model path resolved per request costs one stat.
        self._seen: dict[str, Path] = {}
        # One download per location at a time in this process: concurrent first requests for a model wait for
        # it instead of each fetching a copy.
        self._downloading: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _path(self, location: str) -> Path:
        digest = hashlib.sha256(location.encode()).hexdigest()[:16]
        name = location.rstrip("/").rsplit("/", 1)[-1]
        return self.root / "objects" / f"{digest}-{name}"

    @contextlib.contextmanager
    def _index(self) -> Iterator[dict[str, dict[str, float]]]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.root / "index.json"
            try:
                index: dict[str, dict[str, float]] = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                index = {}
            yield index
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(index))
            tmp.replace(path)

    def get(self, location: str) -> Path:
        path = self._seen.get(location)
        if path is None or not path.exists():
            with self._guard:
                lock = self._downloading.setdefault(location, threading.Lock())
            with lock:
                path = self._get(location)
        # Its last use is its mtime, refreshed here on every use (one syscall), so eviction is least recently
        # *used*, not least recently downloaded, without writing the shared index on every request. Given
        # explicitly: the kernel's own timestamps are coarse (milliseconds), and two uses would tie.
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, (now, now))
        # After the entry is in place (and anything evicted for it is gone): what it refers to may have been
        # evicted since, or never fetched on this machine.
        for referenced in self._references(path).values():
            self.get(referenced)
        return path

    @staticmethod
    def _references(path: Path) -> dict[tuple[str, str], str]:
        """(file, field) → location of what a materialized directory refers to (`REFERENCES_FILE`)."""
        try:
            raw: dict[str, dict[str, str]] = json.loads((path / REFERENCES_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {(name, field): location for name, fields in raw.items() for field, location in fields.items()}

    def _point_references(self, directory: Path) -> None:
        """Rewrite a downloaded directory's referring fields to where this cache keeps each referenced copy."""
        for (name, field), referenced in self._references(directory).items():
            target = directory / name
            document = json.loads(target.read_text(encoding="utf-8"))
            document[field] = str(self._path(referenced))
            target.write_text(json.dumps(document, indent=2), encoding="utf-8")

    def _get(self, location: str) -> Path:
        path = self._path(location)
        with self._index() as index:
            entry = index.get(location)
            if entry is not None and path.exists():
                entry["used"] = time.time()
                self._seen[location] = path
                return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=path.parent))
        try:
            _, key = _parse(location)
            if key.endswith("/"):
                size = _download_dir(key, tmp / "d")
                downloaded = tmp / "d"
                self._point_references(downloaded)
            else:
                object_store().download(key, tmp / "f")
                downloaded = tmp / "f"
                size = downloaded.stat().st_size
            with self._index() as index:
                if not path.exists():
                    downloaded.replace(path)
                index[location] = {"bytes": size, "used": time.time()}
                self._evict(index, keep=location)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._seen[location] = path
        return path

    def _last_use(self, location: str, entry: dict[str, float]) -> float:
        try:
            return self._path(location).stat().st_mtime
        except FileNotFoundError:
            return entry["used"]

    def _evict(self, index: dict[str, dict[str, float]], keep: str) -> None:
        total = sum(e["bytes"] for e in index.values())
        for location, entry in sorted(index.items(), key=lambda item: self._last_use(*item)):
            if total <= self.max_bytes:
                break
            if location == keep:
                continue
            self._remove(self._path(location))
            total -= entry["bytes"]
            del index[location]
            self._seen.pop(location, None)

    def forget(self, location: str) -> None:
        with self._index() as index:
            index.pop(location, None)
            self._remove(self._path(location))
        self._seen.pop(location, None)

    @staticmethod
    def _remove(path: Path) -> None:
        # Renamed away first, so no reader ever finds half a directory at the entry's path.
        if not path.exists():
            return
        doomed = path.with_name(f".evicted-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
        path.replace(doomed)
        if doomed.is_dir():
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            doomed.unlink(missing_ok=True)


_caches: dict[tuple[Path, int], _Cache] = {}


def _cache() -> _Cache:
    settings = get_settings()
    key = (settings.storage_cache_dir, settings.storage_cache_mb * 1024 * 1024)
    if key not in _caches:
        _caches[key] = _Cache(*key)
    return _caches[key]


def cached_bytes() -> int:
    """Bytes this machine's cache holds now (for operators and tests)."""
    with _cache()._index() as index:
        return int(sum(e["bytes"] for e in index.values()))


# --- uploads ------------------------------------------------------------------------------------------


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
