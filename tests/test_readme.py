"""The README cannot rot: its settings table matches the code, and its quickstart runs against `llmos up`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from core.settings import Settings
from tests.conftest import ROOT, free_port, wait_until

README = (ROOT / "README.md").read_text()


def quickstart_block(name: str) -> str:
    match = re.search(rf"<!-- quickstart:{name} -->\n```\w+\n(.*?)```", README, re.S)
    assert match, f"README has no quickstart:{name} block"
    return match.group(1)


def test_settings_table_lists_every_setting() -> None:
    documented = set(re.findall(r"^\| `(LLMOS_[A-Z0-9_]+)` \|", README, re.M))
    actual = {f"LLMOS_{name.upper()}" for name in Settings.model_fields}
    assert documented == actual


def test_quickstart_runs_against_llmos_up() -> None:
    # Not under pytest's 0700 tmp dir: embedded Postgres runs as its own user when root.
    home = Path(tempfile.mkdtemp(prefix="llmos-quickstart-"))
    work = home / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    api_port = free_port()
    # Everything as a newcomer gets it, except the one-minute smollm2 conversion (it has its own slow test).
    env.update(LLMOS_HOME=str(home), LLMOS_API_PORT=str(api_port), LLMOS_FLOWER_PORT=str(free_port()),
               LLMOS_CONVERT_GGUF_MODELS="0",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    out_path = home / "up.out"
    with out_path.open("wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "ops.cli", "up"], cwd=ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def key() -> str | None:
            assert up.poll() is None, out_path.read_text()[-3000:]
            found = re.search(r"^(sk-llmos-\S+)$", out_path.read_text(), re.M)
            return found.group(1) if found else None

        admin_key = wait_until(key, 180, "llmos up to print its admin key", 0.25)
        # What `llmos up` wrote under LLMOS_HOME is its owner's alone (umask 077): the servers' passwords, the
        # state file with the URLs that carry them, the database, the models (the test's own files aside).
        state = home / "run" / "embedded.json"
        assert ":" in json.loads(state.read_text())["database_url"].split("@")[0].split("//")[1]
        loose = [f"{p} {oct(p.stat().st_mode)}" for p in home.rglob("*")
                 if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o077
                 and p != out_path and work not in p.parents]
        assert loose == [], loose
        client_env = {**env, "LLMOS_API_KEY": admin_key, "LLMOS_API_URL": f"http://127.0.0.1:{api_port}"}
        subprocess.run(["bash", "-euo", "pipefail", "-c", quickstart_block("data")], cwd=work, env=client_env,
                       check=True, timeout=60)
        assert len((work / "reviews.jsonl").read_text().splitlines()) == 160

        curl = subprocess.run(["bash", "-euo", "pipefail", "-c", quickstart_block("curl")], cwd=work,
                              env=client_env, capture_output=True, text=True, timeout=300)
        assert curl.returncode == 0, curl.stdout + curl.stderr
        assert '"label":"pos"' in curl.stdout and '"label":"neg"' in curl.stdout, curl.stdout
        assert "Job succeeded" in curl.stdout

        sdk = subprocess.run([sys.executable, "-c", quickstart_block("python")], cwd=work, env=client_env,
                             capture_output=True, text=True, timeout=300)
        assert sdk.returncode == 0, sdk.stdout + sdk.stderr
        assert "succeeded ft:tiny-bert:default::ftjob-" in sdk.stdout, sdk.stdout
        assert "'label': 'pos'" in sdk.stdout, sdk.stdout
    finally:
        alive = up.poll() is None
        pids = [up.pid, *(c.pid for c in psutil.Process(up.pid).children(recursive=True))] if alive else []
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        up.wait(90)
    # SIGTERM stops everything `llmos up` started, embedded Postgres and Redis included.
    leftovers = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert leftovers == [], [psutil.Process(p).cmdline() for p in leftovers]
    servers = [p for p in psutil.process_iter(["cmdline"]) if str(home) in " ".join(p.info["cmdline"] or [])]
    assert servers == []
    assert up.returncode == 0, out_path.read_text()[-3000:]
    # Kept when the test fails, for its logs; as root its cluster goes with it (tests/conftest.py prunes those).
    shutil.rmtree(home, ignore_errors=True)
