"""The `llmos` client and admin commands, run as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ROOT
from tests.data import jsonl, sentiment_rows


def llmos(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=240)


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
    data = tmp_path / "reviews.jsonl"
    data.write_text(jsonl(sentiment_rows(80)))
    uploaded = llmos("files", "upload", str(data), env=env)
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = json.loads(uploaded.stdout)["id"]
    run = llmos("jobs", "create", "--model", "tiny-bert", "--training-file", file_id, "--epochs", "3",
                "--learning-rate", "0.003", "--suffix", "cli", "--watch", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "100.0%" in run.stdout and "succeeded" in run.stdout
    assert "fine_tuned_model: ft:tiny-bert:acme:cli:ftjob-" in run.stdout
    listed = llmos("jobs", "list", env=env)
    assert "succeeded" in listed.stdout
    missing = llmos("jobs", "show", "ftjob-nope", env=env)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
