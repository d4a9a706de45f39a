"""The web dashboard in a real browser against the real stack: sign-in, the live loss chart, the job
controls, the playground, and tenant isolation."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
from playwright.sync_api import expect

from tests.conftest import Api, wait_until
from tests.dashboard.conftest import UI
from tests.data import jsonl, ner_rows, sentiment_rows

# Chrome logs a failed fetch as a console error; the pages that expect a 404 allow exactly that.
NOT_FOUND = "status of 404"


def _failing_job(api: Api) -> dict[str, Any]:
    """A job that fails validation at once: cheap, and listed like any other."""
    file_id = api.upload("this is not json\n").json()["id"]
    job: dict[str, Any] = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert",
                                                                        "training_file": file_id}).json()
    return job


def _trained(api: Api, rows: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    file_id = api.upload(jsonl(rows)).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id, "seed": 7,
        "hyperparameters": {"n_epochs": epochs, "batch_size": 8, "learning_rate": 3e-3}}).json()
    done = api.wait_status(job["id"], {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["status"] == "succeeded", done["error"]
    return done


def _points(ui: UI) -> int:
    return int(ui.page.get_by_test_id("loss-chart").get_attribute("data-points") or 0)


def _drawn_pixels(ui: UI) -> int:
    """Pixels the chart's canvas has painted (uPlot draws the axes, grid and curves on it)."""
    return int(ui.page.get_by_test_id("loss-chart").evaluate(
        """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                  let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"""))


def test_sign_in_keeps_the_key_in_session_storage_and_shows_only_the_tenants_jobs(
        ui: UI, api: Api, api_url: str, make_key: Callable[..., str]) -> None:
    mine = _failing_job(api)
    other = Api(api_url, make_key("someone-else"))
    theirs = _failing_job(other)
    page = ui.page

    ui.sign_in("sk-not-a-key")
    expect(page.get_by_role("alert")).to_contain_text("not accepted")
    assert page.evaluate("sessionStorage.getItem('llmos.apiKey')") is None

    key = api.http.headers["authorization"].split()[-1]
    page.get_by_test_id("api-key-input").fill(key)
    page.get_by_test_id("api-key-submit").click()
    expect(page.locator(f"[data-testid=job-row][data-job-id='{mine['id']}']")).to_be_visible()
    expect(page.get_by_test_id("job-row")).to_have_count(1)
    assert page.evaluate("sessionStorage.getItem('llmos.apiKey')") == key
    assert key not in page.url and page.evaluate("document.cookie") == ""

    # The status filter asks the API for that status only.
    page.get_by_label("Status").select_option("running")
    expect(page.get_by_test_id("job-row")).to_have_count(0)
    page.get_by_label("Status").select_option("")
    expect(page.get_by_test_id("job-row")).to_have_count(1)

    # Another tenant's job id, typed into the address bar, shows nothing of it.
    ui.open(f"#/jobs/{theirs['id']}")
    expect(page.get_by_test_id("not-found")).to_be_visible()
    expect(page.get_by_test_id("job-status")).to_have_count(0)

    # A fresh tab (a new session) asks for the key again.
    fresh = page.context.browser.new_context()
    try:
        again = fresh.new_page()
        again.goto(f"{ui.base}/dashboard#/jobs")
        expect(again.get_by_test_id("api-key-input")).to_be_visible()
    finally:
        fresh.close()
    ui.assert_no_errors(allow=(NOT_FOUND, "status of 401"))


def test_the_loss_chart_grows_live_and_the_buttons_pause_resume_and_cancel(ui: UI, api: Api) -> None:
    file_id = api.upload(jsonl(sentiment_rows(400))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-bert", "training_file": file_id,
        "hyperparameters": {"n_epochs": 50, "batch_size": 2}}).json()
    key = api.http.headers["authorization"].split()[-1]
    ui.sign_in(key, f"#/jobs/{job['id']}")
    page = ui.page
    page.on("dialog", lambda dialog: dialog.accept())  # the cancel button asks for confirmation

    expect(page.get_by_test_id("job-status")).to_have_text("running", timeout=120_000)
    # Points arrive over the SSE stream while the job runs: the chart's count keeps rising.
    first = wait_until(lambda: _points(ui), 60, "the first loss points on the chart")
    wait_until(lambda: _points(ui) > first + 2, 60, "more loss points while the job runs")
    assert _drawn_pixels(ui) > 1000
    expect(page.get_by_test_id("events-list")).to_contain_text("Training started")
    expect(page.get_by_test_id("events-list")).to_contain_text("training loss=")

    expect(page.get_by_test_id("resume-button")).to_be_disabled()
    page.get_by_test_id("pause-button").click()
    expect(page.get_by_test_id("job-status")).to_have_text("paused", timeout=60_000)
    assert api.job(job["id"])["status"] == "paused"
    expect(page.get_by_test_id("checkpoints-table")).to_contain_text("ckpt-step-")
    paused_at = _points(ui)

    page.get_by_test_id("resume-button").click()
    expect(page.get_by_test_id("job-status")).to_have_text("running", timeout=120_000)
    wait_until(lambda: _points(ui) > paused_at, 60, "the chart to go on after the resume")
    expect(page.get_by_test_id("events-list")).to_contain_text("resumed from checkpoint")

    page.get_by_test_id("cancel-button").click()
    expect(page.get_by_test_id("job-status")).to_have_text("cancelled", timeout=60_000)
    assert api.job(job["id"])["status"] == "cancelled"
    for verb in ("cancel", "pause", "resume"):
        expect(page.get_by_test_id(f"{verb}-button")).to_be_disabled()
    ui.assert_no_errors()


def test_the_playground_classifies_finds_entities_and_generates(ui: UI, api: Api) -> None:
    classifier = _trained(api, sentiment_rows(120), epochs=4)
    tagger = _trained(api, ner_rows(120, seed=1), epochs=8)
    key = api.http.headers["authorization"].split()[-1]
    ui.sign_in(key, "#/models")
    page = ui.page
    expect(page.get_by_test_id("models-table")).to_contain_text(classifier["fine_tuned_model"])

    page.get_by_test_id("playground-model").select_option(classifier["fine_tuned_model"])
    page.get_by_test_id("playground-input").fill("the food was wonderful")
    page.get_by_test_id("playground-submit").click()
    expect(page.get_by_test_id("playground-label")).to_have_text("pos", timeout=60_000)
    expect(page.get_by_test_id("playground-output")).to_contain_text("neg")  # every label's score is listed

    page.get_by_test_id("playground-model").select_option(tagger["fine_tuned_model"])
    page.get_by_test_id("playground-input").fill("Mary Jones flew to Berlin yesterday .")
    page.get_by_test_id("playground-submit").click()
    marks = page.get_by_test_id("playground-output").locator("mark")
    expect(marks.first).to_be_visible(timeout=60_000)
    found = {(m.get_attribute("data-entity"), m.evaluate("m => m.firstChild.textContent"))
             for m in marks.all()}
    assert {("PER", "Mary Jones"), ("LOC", "Berlin")} <= found, found

    # A base encoder: zero-shot labels, and embeddings.
    page.get_by_test_id("playground-model").select_option("tiny-bert")
    page.get_by_test_id("playground-mode").select_option("classification")
    page.get_by_test_id("playground-labels").fill("sunny, rainy")
    page.get_by_test_id("playground-input").fill("the sky is clear today")
    page.get_by_test_id("playground-submit").click()
    expect(page.get_by_test_id("playground-label")).to_have_text(re.compile("^(sunny|rainy)$"), timeout=60_000)
    page.get_by_test_id("playground-mode").select_option("embeddings")
    page.get_by_test_id("playground-submit").click()
    expect(page.get_by_test_id("playground-dimensions")).to_have_text(re.compile(r"^[1-9]\d*$"), timeout=60_000)
    expect(page.get_by_test_id("playground-output")).to_contain_text("norm 1")

    page.get_by_test_id("playground-model").select_option("tiny-gpt2")
    page.get_by_test_id("playground-mode").select_option("generation")
    page.get_by_test_id("playground-input").fill("once upon a time")
    page.get_by_test_id("playground-submit").click()
    # Streamed: the usage line replaces "Generating…" once the last chunk (which carries it) arrives.
    expect(page.get_by_test_id("playground-output")).to_contain_text("completion tokens", timeout=60_000)
    expect(page.get_by_test_id("playground-output")).not_to_contain_text("Generating")
    page.get_by_test_id("playground-mode").select_option("chat")
    page.get_by_test_id("playground-input").fill("tell me a story")
    page.get_by_test_id("playground-submit").click()
    expect(page.get_by_test_id("playground-output")).to_contain_text("completion tokens", timeout=60_000)
    # A generation model classifies zero-shot too.
    page.get_by_test_id("playground-mode").select_option("classification")
    page.get_by_test_id("playground-labels").fill("happy, sad")
    page.get_by_test_id("playground-submit").click()
    expect(page.get_by_test_id("playground-label")).to_have_text(re.compile("^(happy|sad)$"), timeout=60_000)
    ui.assert_no_errors()


def test_every_page_renders_from_our_origin_alone(ui: UI, api: Api) -> None:
    job = _failing_job(api)
    requested: list[str] = []
    blocked: set[str] = set()
    ui.page.on("request", lambda request: requested.append(request.url))
    failures: list[str] = []

    def failed(request: Any) -> None:
        failures.append(f"{request.url} {request.failure}")
        if "csp" in (request.failure or "").lower():
            blocked.add(request.url)

    ui.page.on("requestfailed", failed)
    key = api.http.headers["authorization"].split()[-1]
    ui.sign_in(key)
    page = ui.page
    expect(page.get_by_test_id("jobs-table")).to_be_visible()
    for section, testid in (("models", "models-table"), ("batches", "batches-table"),
                            ("webhooks", "webhook-endpoints-table"), ("queues", "queues-table")):
        page.get_by_role("link", name=section.capitalize()).click()
        expect(page.get_by_test_id(testid)).to_be_visible()
    expect(page.get_by_test_id("queues-table")).to_contain_text("training")
    # Ticking a job and comparing opens its curves on one chart.
    page.get_by_role("link", name="Jobs").click()
    page.get_by_label(f"Compare {job['id']}").check()
    page.get_by_test_id("compare-button").click()
    expect(page.get_by_test_id("compare-table")).to_contain_text(job["id"])
    expect(page.get_by_test_id("loss-chart")).to_be_attached()
    # The theme button flips between light and dark and the page stays readable (its colours change).
    before = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.get_by_label("Switch colour theme").click()
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != before

    # The API's own docs pages render offline: Swagger UI and ReDoc load their scripts from us.
    page.goto(f"{ui.base}/docs")
    expect(page.locator(".swagger-ui .info")).to_contain_text("LLM OS")
    page.goto(f"{ui.base}/redoc")
    expect(page.locator("redoc, [role=search], .api-content").first).to_be_attached()
    expect(page.get_by_text("Fine-tune and serve language models").first).to_be_visible()
    # ReDoc's footer asks for its vendor's logo from a CDN: the page's policy stops it in the browser.
    def foreign() -> list[str]:
        page.evaluate("0")  # a call into the browser delivers the events that are due
        return [url for url in requested if not url.startswith((ui.base, "data:", "blob:")) and url not in blocked]

    wait_until(lambda: not foreign(), 10, f"requests to other origins to be blocked: {foreign()} {failures}")
    ui.assert_no_errors(allow=("Content Security Policy",))


def test_the_dashboard_is_served_with_a_strict_content_security_policy(api_url: str) -> None:
    page = httpx.get(f"{api_url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "http" not in page.text.split("<body>")[0], "no asset from another origin"
    script = httpx.get(f"{api_url}/dashboard/assets/js/main.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    etag = script.headers["etag"]
    assert httpx.get(f"{api_url}/dashboard/assets/js/main.js", headers={"If-None-Match": etag}).status_code == 304
    assert httpx.get(f"{api_url}/dashboard/assets/../../app.py").status_code == 404
    assert httpx.get(f"{api_url}/dashboard/assets/%2e%2e/%2e%2e/app.py").status_code == 404
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        assert httpx.get(f"{api_url}/docs/assets/{asset}").status_code == 200, asset


def test_every_page_passes_an_accessibility_audit_in_light_and_dark(ui: UI, api: Api) -> None:
    """axe-core's WCAG 2.1 A and AA rules (labels, names, contrast, landmarks) on every page, both themes."""
    from axe_playwright_python.sync_playwright import Axe

    job = _failing_job(api)
    api.wait_status(job["id"], {"failed"}, timeout=60)
    key = api.http.headers["authorization"].split()[-1]
    page = ui.page
    axe = Axe()
    options = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]},
               "resultTypes": ["violations"]}
    ui.open("#/jobs")
    expect(page.get_by_test_id("api-key-input")).to_be_visible()
    pages = {"sign-in": ("", "api-key-input")}
    found: list[str] = []

    def audit(name: str, theme: str) -> None:
        results = axe.run(page, options=options)
        for violation in results.response["violations"]:
            if violation["impact"] in ("serious", "critical"):
                targets = [node["target"] for node in violation["nodes"]][:3]
                found.append(f"{name} ({theme}): {violation['id']}: {violation['help']} {targets}")

    for theme in ("light", "dark"):
        page.evaluate(f"localStorage.setItem('llmos.theme', '{theme}')")
        page.evaluate("sessionStorage.clear()")
        ui.open("#/jobs")
        page.reload()
        expect(page.get_by_test_id(pages["sign-in"][1])).to_be_visible()
        audit("sign-in", theme)
        page.get_by_test_id("api-key-input").fill(key)
        page.get_by_test_id("api-key-submit").click()
        for name, fragment, testid in (
                ("jobs", "#/jobs", "job-row"), ("job", f"#/jobs/{job['id']}", "events-list"),
                ("models", "#/models", "models-table"), ("batches", "#/batches", "batches-table"),
                ("webhooks", "#/webhooks", "webhook-endpoints-table"), ("queues", "#/queues", "queues-table")):
            ui.open(fragment)
            expect(page.get_by_test_id(testid).first).to_be_visible()
            audit(name, theme)
    assert not found, "\n".join(found)
