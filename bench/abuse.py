"""Benchmark: what one abusive client does to everyone else.

Runs the availability attacks of the hardening work against a running stack (the API and workers as
`llmos up` runs them) while another tenant polls its job, and prints, per attack, that tenant's GET p99
beside its idle p99 and whether it stayed under 3x:

- unauthenticated chunked uploads that never end (refused with 401 before a byte is read);
- a flood of requests from one tenant over its rate limit (429s);
- bodies over the cap, sent chunked with a valid key (413 at the cap);
- poisoned training files (nesting thousands deep), submitted as jobs over and over;
- webhook receivers that answer a byte every two seconds, fed by failing jobs.

Usage:
    python bench/abuse.py [--probes 300]

Servers as in bench/lifecycle.py: LLMOS_DATABASE_URL / LLMOS_BROKER_URL when set, else embedded ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.fairness import create_tenant  # noqa: E402  (the repository root must be on the path first)
from bench.lifecycle import Child, bring_up, machine_facts, percent, scratch_dir, table  # noqa: E402
from tests.receiver import hostile, trickle  # noqa: E402

ATTACKERS = 16
LIMIT_RATIO = 3.0


def probe(base: str, headers: dict[str, str], path: str, count: int) -> float:
    """p99 latency (s) of ``count`` sequential GETs on one kept-alive connection."""
    latencies = []
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        for _ in range(count):
            started = time.perf_counter()
            response = http.get(path)
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"the victim's GET answered {response.status_code}: {response.text}")
    latencies.sort()
    return latencies[max(0, -(-99 * len(latencies) // 100) - 1)]


def endless_upload_without_key(base: str, stop: threading.Event) -> None:
    url = httpx.URL(base)
    while not stop.is_set():
        with contextlib.suppress(OSError), socket.create_connection((url.host, url.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
            while not stop.is_set():
                sock.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")


def flood_requests(base: str, headers: dict[str, str], stop: threading.Event) -> None:
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        while not stop.is_set():
            http.get("/v1/files")


def oversized_bodies(base: str, headers: dict[str, str], stop: threading.Event) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"model": "tiny-bert", "training_file": "'
        for _ in range(20):  # 20 MiB, past the 8 MiB cap
            yield b"x" * (1024 * 1024)
        yield b'"}'

    with httpx.Client(base_url=base, headers={**headers, "content-type": "application/json"}, timeout=30) as http:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                http.post("/v1/fine_tuning/jobs", content=body())


def poisoned_jobs(base: str, headers: dict[str, str], stop: threading.Event) -> None:
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        content = '{"text": "a", "label": "x"}\n' + "[" * 200_000 + "\n"
        file_id = http.post("/v1/files", data={"purpose": "fine-tune"},
                            files={"file": ("poison.jsonl", content.encode())}).json()["id"]
        while not stop.is_set():
            http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id})


def slow_webhooks(base: str, headers: dict[str, str], stop: threading.Event, *, url: str) -> None:
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        for _ in range(5):
            http.post("/v1/webhook_endpoints", json={"url": url, "events": ["*"]})
        file_id = http.post("/v1/files", data={"purpose": "fine-tune"},
                            files={"file": ("bad.jsonl", b'{"text": "", "label": "a"}\n')}).json()["id"]
        while not stop.is_set():
            http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id})
            stop.wait(0.2)


def under_attack(attack: Callable[[threading.Event], None], callers: int, measure: Callable[[], float]) -> float:
    stop = threading.Event()
    threads = [threading.Thread(target=attack, args=(stop,), daemon=True) for _ in range(callers)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)  # let it reach full swing before measuring
        return measure()
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def run(args: argparse.Namespace, work: Path) -> None:
    import os

    facts = machine_facts()
    command = shlex.join(["python", *sys.argv])
    print(f"command: {command}")
    print(f"machine: {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable) {facts['cpu_model']}; "
          f"CPU idle before start: {percent(facts['cpu_idle_before'])}")
    # The slow receiver listens on loopback, which webhooks may reach only when allowed.
    os.environ["LLMOS_WEBHOOK_ALLOW_PRIVATE"] = "1"
    failure_logs: list[Child] = []
    rows: list[list[str]] = [["attack", "victim GET p99 ms", "idle p99 ms", "ratio", f"< {LIMIT_RATIO:g}x"]]
    report: dict[str, Any] = {"command": command, "machine": facts, "attacks": {}}
    with contextlib.ExitStack() as exits:
        try:
            stack = bring_up(exits, work, failure_logs)
            print(f"services: {stack.mode}")
            base = stack.api_url
            victim = create_tenant("victim")

            def attacker(name: str) -> dict[str, str]:
                """A tenant of its own per attack: one attack's rate limit does not blunt the next."""
                return create_tenant(f"attacker-{name}", rpm=600, max_active_jobs=5000)

            with httpx.Client(base_url=base, headers=victim, timeout=30) as http:
                file_id = http.post("/v1/files", data={"purpose": "fine-tune"},
                                    files={"file": ("t.jsonl", b'{"text": "a", "label": "x"}\n')}).json()["id"]
                job_id = http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id,
                                                                 "suffix": "victim"}).json()["id"]
            path = f"/v1/fine_tuning/jobs/{job_id}"

            def measure() -> float:
                return probe(base, victim, path, args.probes)

            probe(base, victim, path, 50)  # warm
            idle = measure()
            with hostile(trickle) as (slow_url, _):
                attacks: dict[str, tuple[Callable[[threading.Event], None], int]] = {
                    "chunked uploads without a key": (partial(endless_upload_without_key, base), ATTACKERS),
                    "one tenant over its rate limit": (partial(flood_requests, base, attacker("flood")), ATTACKERS),
                    "bodies over the cap (chunked)": (partial(oversized_bodies, base, attacker("bodies")), 4),
                    "poisoned training files": (partial(poisoned_jobs, base, attacker("poison")), 2),
                    "trickling webhook receivers": (
                        partial(slow_webhooks, base, attacker("hooks"), url=slow_url), 1),
                }
                for name, (attack, callers) in attacks.items():
                    loaded = under_attack(attack, callers, measure)
                    ratio = loaded / idle
                    report["attacks"][name] = {"p99_ms": round(loaded * 1000, 2), "idle_p99_ms": round(idle * 1000, 2),
                                               "ratio": round(ratio, 2), "ok": ratio < LIMIT_RATIO}
                    rows.append([name, f"{loaded * 1000:.1f}", f"{idle * 1000:.1f}", f"{ratio:.1f}x",
                                 "yes" if ratio < LIMIT_RATIO else "NO"])
                    print(f"{name}: victim p99 {loaded * 1000:.1f} ms (idle {idle * 1000:.1f} ms)")
        except Exception:
            for child in failure_logs:
                print(f"--- last lines of {child.name} ({child.log_path}) ---\n{child.tail()}", file=sys.stderr)
            raise
    print()
    print(f"Another tenant's GET of its job ({args.probes} sequential requests) under each attack")
    print(table(rows))
    print(json.dumps(report))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--probes", type=int, default=300, help="sequential GETs per measurement (300)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with scratch_dir() as work:
        run(args, work)


if __name__ == "__main__":
    main()
