"""The `llmos` client and admin commands, run as a user would run them."""

from __future__ import annotations

import itertools
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ROOT
from tests.data import jsonl, sentiment_rows


def llmos(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=240)


def llmos_on_terminal(*args: str, env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    """Run `llmos` with stdout and stderr on a pseudo-terminal, as in a user's shell; the exit code and all it wrote."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", *args], cwd=ROOT, stdin=secondary, stdout=secondary,
                            stderr=secondary, env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", **env})
    os.close(secondary)
    written = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([primary], [], [], 1)[0]:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: the child closed the terminal's last descriptor.
                    break
                if not chunk:
                    break
                written += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=10), written.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(primary)


def progress_lines(stdout: str) -> list[str]:
    """The lines `jobs create --watch` printed between the created job's JSON and the final result."""
    lines = stdout.splitlines()
    start = len(lines) - lines[::-1].index("}")
    end = next(i for i, line in enumerate(lines) if line.startswith("fine_tuned_model:"))
    return lines[start:end]


def upload_sentiment(tmp_path: Path, env: dict[str, str]) -> str:
    data = tmp_path / "reviews.jsonl"
    data.write_text(jsonl(sentiment_rows(80)))
    uploaded = llmos("files", "upload", str(data), env=env)
    assert uploaded.returncode == 0, uploaded.stderr
    file_id: str = json.loads(uploaded.stdout)["id"]
    return file_id


def test_keys_create_list_revoke(services: dict[str, str]) -> None:
    created = llmos("keys", "create", "--tenant", "cli-co", "--scope", "files,inference", env={})
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-llmos-")
    as_json = json.loads(llmos("keys", "create", "--tenant", "cli-co", "--json", env={}).stdout)
    assert as_json["tenant"] == "cli-co" and "admin" not in as_json["scopes"]
    assert set(as_json["scopes"]) == {"files", "fine_tuning", "batches", "inference", "webhooks"}
    listed = llmos("keys", "list", env={}).stdout
    assert as_json["id"] in listed and "files,inference" in listed
    assert llmos("keys", "revoke", as_json["id"], env={}).returncode == 0
    assert "revoked" in llmos("keys", "list", env={}).stdout
    bad = llmos("keys", "create", "--tenant", "x", "--scope", "root", env={})
    assert bad.returncode != 0 and "unknown scope" in bad.stderr


def test_upload_create_and_watch_to_success(api_url: str, make_key: Callable[..., str], tmp_path: Path) -> None:
    key = make_key()
    env = {"LLMOS_API_URL": api_url, "LLMOS_API_KEY": key}
    file_id = upload_sentiment(tmp_path, env)
    run = llmos("jobs", "create", "--model", "tiny-bert", "--training-file", file_id, "--epochs", "3",
                "--learning-rate", "0.003", "--suffix", "cli", "--watch", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fine_tuned_model: ft:tiny-bert:acme:cli:ftjob-" in run.stdout
    # httpx logs every request at INFO; a client configured at INFO put one line per poll among the progress.
    assert "HTTP Request" not in run.stdout + run.stderr
    # Into a pipe: plain lines, no carriage returns redrawing a bar.
    assert "\r" not in run.stdout
    lines = progress_lines(run.stdout)
    # The first poll follows the create at once, long before tiny-bert has trained.
    assert lines[0].split()[0] in {"validating_files", "queued", "running"}, lines
    final = lines[-1]
    assert final.startswith("succeeded") and "100.0%" in final, lines
    assert re.search(r"step (\d+)/\1\b", final), final
    # A line per status change or per 5 points of progress, not one per poll: readable in a CI log.
    assert len(lines) <= 4 + 100 // 5 + 1, lines
    seen = [re.match(r"(.*?)\s+([\d.]+)%", line).groups() for line in lines]  # type: ignore[union-attr]
    for (status, percent), (next_status, next_percent) in itertools.pairwise(seen):
        moved = float(next_percent) - float(percent)
        assert moved >= 0 and (next_status != status or moved >= 5), lines
    listed = llmos("jobs", "list", env=env)
    assert "succeeded" in listed.stdout
    missing = llmos("jobs", "show", "ftjob-nope", env=env)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr


def test_watch_on_a_terminal_redraws_one_bar(api_url: str, make_key: Callable[..., str], tmp_path: Path) -> None:
    env = {"LLMOS_API_URL": api_url, "LLMOS_API_KEY": make_key()}
    file_id = upload_sentiment(tmp_path, env)
    created = llmos("jobs", "create", "--model", "tiny-bert", "--training-file", file_id, "--epochs", "3",
                    "--learning-rate", "0.003", env=env)
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]
    code, screen = llmos_on_terminal("jobs", "watch", job_id, env=env)
    assert code == 0, screen
    assert "HTTP Request" not in screen
    # Redrawn in place: each update returns to the line's start and clears it, rather than adding a line.
    assert screen.count("\r\x1b[2K") >= 2, screen
    before_result = screen[:screen.index("fine_tuned_model:")]
    assert before_result.count("\n") <= 2, screen
    last_frame = before_result.rsplit("\x1b[2K", 1)[-1]
    assert "succeeded" in last_frame and "100.0%" in last_frame, last_frame
    assert re.search(r"step (\d+)/\1\b", last_frame), last_frame
    assert "fine_tuned_model: ft:tiny-bert:acme:" in screen
