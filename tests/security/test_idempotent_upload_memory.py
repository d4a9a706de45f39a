"""An upload with `Idempotency-Key` is fingerprinted as it streams and spooled to disk: the API process
never holds it in memory whole (before, it held the body, and for multipart a second, rewritten copy)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Process, free_port, wait_until

UPLOAD_BYTES = 96 * 1024 * 1024


@pytest.fixture
def roomy_api(services: dict[str, str]) -> Iterator[tuple[str, Process]]:
    """A second API process on the suite's database, whose upload cap admits the large file."""
    from ops.stack import argv

    port = free_port()
    env = {**{k: v for k, v in services.items() if k.startswith("LLMOS_")},
           "LLMOS_API_PORT": str(port), "LLMOS_MAX_UPLOAD_BYTES": str(2 * UPLOAD_BYTES)}
    logs = Path(services["home"]) / "logs"
    logs.mkdir(exist_ok=True)
    process = Process("api-roomy", argv("api"), env, logs)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.popen.poll() is None, process.tail()
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 60, "the second API")
    yield url, process
    process.stop()


def test_an_idempotent_upload_is_not_held_in_memory(roomy_api: tuple[str, Process],
                                                     make_key: Callable[..., str]) -> None:
    url, process = roomy_api
    key = make_key()
    content = (b'{"text": "the room was lovely", "label": "pos"}\n' * (UPLOAD_BYTES // 48 + 1))[:UPLOAD_BYTES]
    # `llmos api` may serve from several processes: the one that takes the request is among them.
    root = psutil.Process(process.popen.pid)
    servers = [root, *root.children(recursive=True)]
    baseline = {p.pid: p.memory_info().rss for p in servers}
    grown = 0
    done = threading.Event()

    def sample() -> None:
        # A measurement beside the request, not a synchronisation: it runs until the upload returns.
        nonlocal grown
        while not done.is_set():
            for p in servers:
                grown = max(grown, p.memory_info().rss - baseline[p.pid])
            done.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as http:
        try:
            first = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("big.jsonl", content)},
                              headers={"Idempotency-Key": "big-upload"})
        finally:
            done.set()
            sampler.join()
        assert first.status_code == 200, first.text
        # Before: the whole body, then a rewritten copy of it, about 2 x 96 MiB.
        assert grown < UPLOAD_BYTES // 2, f"the API grew by {grown >> 20} MiB for a {UPLOAD_BYTES >> 20} MiB upload"

        again = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("big.jsonl", content)},
                          headers={"Idempotency-Key": "big-upload"})
        assert again.headers.get("idempotent-replayed") == "true" and again.json()["id"] == first.json()["id"]
        stored = http.get(f"/v1/files/{first.json()['id']}/content")
        assert hashlib.sha256(stored.content).hexdigest() == hashlib.sha256(content).hexdigest()
