"""Client commands of the CLI: files upload, jobs create|list|show|watch|cancel."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, TextIO

import httpx

from core.settings import get_settings
from ops.progress import TERMINAL, job_display


class ClientError(Exception):
    pass


def _base_url() -> str:
    return os.environ.get("LLMOS_API_URL") or f"http://127.0.0.1:{get_settings().api_port}"


def _client() -> httpx.Client:
    key = os.environ.get("LLMOS_API_KEY")
    if not key:
        raise ClientError("set LLMOS_API_KEY to an API key (llmos keys create --tenant NAME)")
    return httpx.Client(base_url=_base_url(), headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except Exception:
            message = response.text
        raise ClientError(f"HTTP {response.status_code}: {message}")
    return response.json()


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def upload(path: Path, purpose: str) -> dict[str, Any]:
    with _client() as client, path.open("rb") as fh:
        result: dict[str, Any] = _check(client.post("/v1/files", data={"purpose": purpose},
                                                    files={"file": (path.name, fh)}))
    return result


def create_job(args: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": args.model, "training_file": args.training_file}
    if args.validation_file:
        body["validation_file"] = args.validation_file
    if args.task:
        body["task"] = args.task
    hp = {k: v for k, v in (("n_epochs", args.epochs), ("batch_size", args.batch_size),
                            ("learning_rate", args.learning_rate)) if v is not None}
    if hp:
        body["hyperparameters"] = hp
    if args.suffix:
        body["suffix"] = args.suffix
    if getattr(args, "processes", None):
        body["compute"] = {"processes": args.processes}
    with _client() as client:
        result: dict[str, Any] = _check(client.post("/v1/fine_tuning/jobs", json=body))
    return result


def watch(job_id: str, interval: float = 1.0, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Show the job's progress until it ends (a bar on a terminal, plain lines otherwise); returns the final job."""
    with _client() as client, job_display(out) as display:
        while True:
            job: dict[str, Any] = _check(client.get(f"/v1/fine_tuning/jobs/{job_id}"))
            display.update(job)
            if job["status"] in TERMINAL:
                break
            time.sleep(interval)  # A client-side refresh rate, not synchronisation.
    if job["status"] == "succeeded":
        out.write(f"fine_tuned_model: {job['fine_tuned_model']}\nmetrics: {json.dumps(job['metrics'])}\n")
    elif job.get("error"):
        out.write(f"error: {job['error'].get('code')}: {job['error'].get('message')}\n")
    out.flush()
    return job


def tail_events(event_type: str | None, follow: bool, interval: float = 1.0, out: TextIO = sys.stdout) -> None:
    """Print the tenant's events oldest first, then keep printing new ones (until Ctrl-C) when following."""
    seen: set[str] = set()
    params: dict[str, Any] = {"limit": 100}
    if event_type:
        params["type"] = event_type
    with _client() as client:
        while True:
            page = _check(client.get("/v1/events", params=params))
            for event in reversed(page["data"]):
                if event["id"] in seen:
                    continue
                seen.add(event["id"])
                data = event["data"] or {}
                status = data.get("status") or ""
                out.write(f"{event['created_at']}  {event['id']}  {event['type']:<34} {data.get('id', '')} {status}\n")
            out.flush()
            if not follow:
                return
            time.sleep(interval)  # A client-side refresh rate, not synchronisation.


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def quiet_http_logs() -> None:
    """Keep httpx's per-request INFO lines ("HTTP Request: GET ... 200 OK") off the user's screen.

    They would land between progress updates every second; below DEBUG nobody asked for them.
    """
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run(args: Any) -> None:
    """Dispatch a parsed client command."""
    quiet_http_logs()
    try:
        if args.command == "events":
            tail_events(args.type, not args.no_follow)
        elif args.command == "files":
            _print(upload(Path(args.path), args.purpose))
        elif args.jobs_command == "create":
            job = create_job(args)
            _print(job)
            if args.watch:
                final = watch(job["id"])
                if final["status"] != "succeeded":
                    raise SystemExit(1)
        elif args.jobs_command == "list":
            with _client() as client:
                page = _check(client.get("/v1/fine_tuning/jobs", params={"limit": args.limit}))
            for job in page["data"]:
                print(f"{job['id']}  {job['status']:<16} {job['model']:<20} {job['fine_tuned_model'] or ''}")
        elif args.jobs_command == "show":
            with _client() as client:
                _print(_check(client.get(f"/v1/fine_tuning/jobs/{args.job_id}")))
        elif args.jobs_command == "watch":
            final = watch(args.job_id)
            if final["status"] != "succeeded":
                raise SystemExit(1)
        elif args.jobs_command == "cancel":
            with _client() as client:
                _print(_check(client.post(f"/v1/fine_tuning/jobs/{args.job_id}/cancel")))
    except ClientError as exc:
        fail(str(exc))
    except httpx.HTTPError as exc:
        fail(f"cannot reach the API at {_base_url()}: {exc}")
    except KeyboardInterrupt:
        # Ctrl-C is how one stops watching or tailing: the job goes on, so no traceback; 130 as shells report it.
        raise SystemExit(130) from None
