"""Models: base models from the registry and each tenant's fine-tuned ones."""

from __future__ import annotations

import contextlib
import io
import queue
import tarfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from api import objects
from api.boundary import read, transaction
from api.deps import Principal, authenticate, require
from api.errors import APIError
from domain import models, storage
from infra import objectstore  # noqa: F401  (installs the object store for LLMOS_STORAGE_URL)

router = APIRouter(prefix="/v1/models", tags=["models"])
fine_tuning = require("fine_tuning")


@router.get("", summary="List models", response_model=objects.ListOf[objects.Model])
async def list_models(principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    return await read(models.list_models, tenant_id=principal.tenant_id)


@router.get("/{model_id}", summary="Retrieve a model", response_model=objects.Model)
async def get_model(model_id: str, principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    return await read(models.get_model, tenant_id=principal.tenant_id, model_id=model_id)


# A model is written out as it is read, in chunks of this size, at most this many waiting for the client.
TAR_CHUNK = 1024 * 1024
TAR_CHUNKS_AHEAD = 8


class _Stopped(Exception):
    """The client went away: the tar writer stops."""


class _Chunks(io.RawIOBase):
    """A write-only file that hands what is written to a bounded queue, a chunk at a time."""

    def __init__(self, out: queue.Queue[bytes | None], stopped: threading.Event) -> None:
        self.out, self.stopped, self.buffer = out, stopped, bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.buffer += data
        while len(self.buffer) >= TAR_CHUNK:
            self._put(bytes(self.buffer[:TAR_CHUNK]))
            del self.buffer[:TAR_CHUNK]
        return len(data)

    def finish(self) -> None:
        if self.buffer:
            self._put(bytes(self.buffer))
        self.buffer.clear()

    def _put(self, chunk: bytes) -> None:
        while not self.stopped.is_set():
            try:
                self.out.put(chunk, timeout=0.5)
                return
            except queue.Full:
                continue
        raise _Stopped


async def _tar_stream(source: Path, name: str) -> AsyncIterator[bytes]:
    """The tar of ``source`` as it is written: no copy on disk, at most a few MiB in memory."""
    chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=TAR_CHUNKS_AHEAD)
    stopped = threading.Event()

    def write() -> None:
        writer = _Chunks(chunks, stopped)
        try:
            with tarfile.open(fileobj=writer, mode="w|") as archive:  # stream mode: never seeks back
                archive.add(source, arcname=name)
            writer.finish()
        except _Stopped:
            return
        finally:
            with contextlib.suppress(queue.Full):
                chunks.put(None, timeout=0.5)

    thread = threading.Thread(target=write, name=f"tar {name}", daemon=True)
    thread.start()
    try:
        while (chunk := await anyio.to_thread.run_sync(chunks.get)) is not None:
            yield chunk
    finally:
        stopped.set()


@router.get("/{model_id}/content", summary="Download a fine-tuned model as a tar of save_pretrained output (extension)",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}}, "description": "The model's files as a tar"}})
async def model_content(model_id: str, principal: Principal = Depends(fine_tuning)) -> StreamingResponse:
    location = await read(models.files_of, tenant_id=principal.tenant_id, model_id=model_id)
    try:
        source = await anyio.to_thread.run_sync(storage.materialize, location)
    except FileNotFoundError:
        source = Path(location)
    if not source.is_dir():
        raise APIError(409, f"the files of '{model_id}' are not available on this server", code="model_files_missing")
    name = model_id.replace(":", "_")
    return StreamingResponse(_tar_stream(source, name), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{name}.tar"'})


@router.delete("/{model_id}", summary="Delete a fine-tuned model", response_model=objects.Deleted)
async def delete_model(model_id: str, principal: Principal = Depends(fine_tuning)) -> dict[str, Any]:
    return await transaction(models.delete_model, tenant_id=principal.tenant_id, model_id=model_id)
