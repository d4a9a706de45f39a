"""Remake the README's dashboard screenshots: the jobs list, and a running job with its live loss chart.

    python bench/screenshots.py [--out docs/img]

Starts the stack as the benchmarks do (embedded Postgres and Redis unless LLMOS_DATABASE_URL and
LLMOS_BROKER_URL are set), trains a few tiny-bert jobs on generated sentences, and photographs the
dashboard in the machine's Chromium (LLMOS_CHROMIUM, or the first of chromium / chromium-browser on PATH),
driven by Playwright.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lifecycle import Child, bring_up, scratch_dir, wait_until

ROOT = Path(__file__).resolve().parent.parent
WORDS = {"pos": ["great", "lovely", "wonderful", "superb", "moving", "sharp"],
         "neg": ["awful", "dull", "tedious", "clumsy", "bland", "weak"]}
SUBJECTS = ["the plot", "the acting", "this film", "the score", "the ending", "the dialogue", "the pacing"]


def sentences(n: int, seed: int) -> str:
    """Labelled sentences with some label noise, so the curves look like real training, not a cliff."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        word = rng.choice(WORDS[label if rng.random() > 0.1 else ("neg" if label == "pos" else "pos")])
        tail = f"{rng.choice(SUBJECTS)} {rng.choice(['too', 'mostly', 'again'])}"
        rows.append({"text": f"{rng.choice(SUBJECTS)} was {word} and {tail}", "label": label})
    return "".join(json.dumps(r) + "\n" for r in rows)


def chromium() -> str:
    import os

    path = os.environ.get("LLMOS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        sys.exit("no Chromium found: apt-get install chromium, or set LLMOS_CHROMIUM")
    return path


def create_job(http: httpx.Client, train: str, valid: str, epochs: int, batch: int, suffix: str) -> dict[str, Any]:
    response = http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": train, "validation_file": valid, "suffix": suffix, "seed": 7,
        "hyperparameters": {"n_epochs": epochs, "batch_size": batch, "learning_rate": 1e-3}})
    response.raise_for_status()
    job: dict[str, Any] = response.json()
    return job


def run(out: Path, work: Path) -> None:
    from ops.bootstrap import create_key

    failure_logs: list[Child] = []
    with contextlib.ExitStack() as exits:
        try:
            stack = bring_up(exits, work, failure_logs)
        except Exception:
            for child in failure_logs:
                print(f"--- {child.name} ---\n{child.tail()}", file=sys.stderr)
            raise
        key = create_key("screenshots", ["files", "fine_tuning", "inference", "batches", "webhooks"])[1]
        http = exits.enter_context(httpx.Client(base_url=stack.api_url, timeout=60,
                                                headers={"Authorization": f"Bearer {key}"}))

        def upload(content: str, name: str) -> str:
            response = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (name, content.encode())})
            response.raise_for_status()
            return str(response.json()["id"])

        train = upload(sentences(600, 1), "reviews-train.jsonl")
        valid = upload(sentences(120, 2), "reviews-valid.jsonl")
        finished = create_job(http, train, valid, 3, 16, "baseline")
        wait_until(lambda: http.get(f"/v1/fine_tuning/jobs/{finished['id']}").json()["status"] == "succeeded",
                   300, "the first job to succeed")
        running = create_job(http, train, valid, 30, 4, "long")
        queued = create_job(http, train, valid, 5, 8, "next")
        failing = http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert",
                                                          "training_file": upload("not json\n", "broken.jsonl")})
        failing.raise_for_status()

        from playwright.sync_api import sync_playwright

        out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium(), args=[
                "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1366, "height": 860}, device_scale_factor=1)
            page.goto(f"{stack.api_url}/dashboard")
            page.get_by_test_id("api-key-input").fill(key)
            page.get_by_test_id("api-key-submit").click()
            page.goto(f"{stack.api_url}/dashboard#/jobs/{running['id']}")
            page.get_by_test_id("job-status").filter(has_text="running").wait_for(timeout=300_000)

            def enough_points() -> bool:
                points = page.get_by_test_id("loss-chart").get_attribute("data-points")
                return int(points or 0) >= 90

            wait_until(enough_points, 300, "the chart to hold 90 points")
            page.screenshot(path=str(out / "dashboard-job.png"))
            page.goto(f"{stack.api_url}/dashboard#/jobs")
            page.get_by_test_id("job-row").nth(3).wait_for()
            page.screenshot(path=str(out / "dashboard-jobs.png"))
            browser.close()
        http.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel")
        http.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel")
    print(f"wrote {out / 'dashboard-jobs.png'} and {out / 'dashboard-job.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go (docs/img)")
    args = parser.parse_args()
    with scratch_dir() as work:
        run(args.out, work)


if __name__ == "__main__":
    main()
