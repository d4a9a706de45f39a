"""The shipped Grafana dashboard and Prometheus alerts query only metrics that the real API exports.

Every PromQL expression in ops/grafana/llmos.json and ops/prometheus/alerts.yml is parsed for the metric names
it selects, and each must be a series of a live scrape of /metrics from the running stack. The families the
workers' work feeds (inference batch sizes, webhook attempts, training throughput and heartbeats) are checked
to report that work when it happens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, Api, wait_until
from tests.data import jsonl, sentiment_rows
from tests.receiver import receiver

DASHBOARD = ROOT / "ops" / "grafana" / "llmos.json"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"

# Words of PromQL that may stand where a metric name could: operators and modifiers. Functions and
# aggregations are told apart by the parenthesis after them.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan", "atan2"}
# The series a family of each type exports (a family with no samples yet still declares its type).
SERIES_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                   "summary": ("", "_sum", "_count"), "unknown": ("",), "untyped": ("",)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range and subquery windows ([5m], [$__rate_interval])
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", expr):
        if match.group() in KEYWORDS or expr[match.end():].lstrip().startswith("("):
            continue  # an operator, or a function or aggregation being called
        names.add(match.group())
    return names


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard's panels (rows included) and template variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    queries = [t["expr"] for p in panels for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def exported_series(scrape: str) -> set[str]:
    """Names of the series a /metrics scrape exports, or declares by its families' types."""
    names: set[str] = set()
    for family in text_string_to_metric_families(scrape):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES[family.type])
    return names


def sample(scrape: str, name: str, **labels: str) -> float | None:
    """The value of one series in a scrape; None when it is not there."""
    for family in text_string_to_metric_families(scrape):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (route, le) (rate(llmos_http_request_seconds_bucket{route=~"/v1.*"}[5m])))'
    ) == {"llmos_http_request_seconds_bucket"}
    assert metric_names('max(a_total{outcome="failed"}) / (max(b) + max(c)) > 0.25 and on() max(d) >= 1e3') \
        == {"a_total", "b", "c", "d"}
    assert metric_names("sum(rate(x[$__rate_interval] offset 5m)) by (le) unless y") == {"x", "y"}


def test_the_dashboard_and_alerts_cover_what_operators_asked_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["title"] and p["targets"] and p.get("description") for p in panels)
    queried = set().union(*map(metric_names, dashboard_queries()))
    for family in ("llmos_http_requests_total", "llmos_http_request_seconds_bucket", "llmos_jobs",
                   "llmos_queue_depth", "llmos_training_samples_per_second", "llmos_webhook_attempts_last_5m",
                   "llmos_worker_heartbeat_age_seconds", "llmos_inference_batch_size_bucket"):
        assert family in queried, f"no panel shows {family}"

    rules = alert_rules()
    assert {r["alert"] for r in rules} == {"LlmosNoWorkerHeartbeats", "LlmosQueueGrowing", "LlmosWebhookFailures",
                                          "Llmos5xxRate"}
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_every_queried_metric_is_exported_by_the_running_api(api: Api, anon: Api) -> None:
    # The request histogram exists once a request was timed.
    assert api.http.get("/v1/models").status_code == 200
    exported = exported_series(anon.http.get("/metrics").text)
    queries = dashboard_queries() + [rule["expr"] for rule in alert_rules()]
    queried = set().union(*map(metric_names, queries))
    missing = sorted(queried - exported)
    assert not missing, f"queried but not exported by /metrics: {missing}"
    # The check bites: a misspelt name is not among the exported ones.
    assert metric_names("rate(llmos_http_request_total[5m])") - exported == {"llmos_http_request_total"}


def _scrape_until(anon: Api, what: str, predicate: Callable[[str], bool], timeout: float = 60) -> str:
    """The first /metrics scrape that satisfies ``predicate``, polled until ``timeout``."""

    def scrape() -> str | None:
        text = anon.http.get("/metrics").text
        return text if predicate(text) else None

    found: str = wait_until(scrape, timeout, what, 0.2)
    return found


def test_inference_batches_and_webhook_attempts_show_in_the_metrics(api: Api, anon: Api) -> None:
    before = sample(anon.http.get("/metrics").text, "llmos_inference_batch_size_count") or 0.0
    completion = api.http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": ["hello", "there"],
                                                        "max_tokens": 2, "temperature": 0})
    assert completion.status_code == 200, completion.text
    # The worker adds its counts to Redis within a second of the forward pass.
    scrape = _scrape_until(anon, "the forward pass to be counted",
                           lambda text: (sample(text, "llmos_inference_batch_size_count") or 0.0) > before)
    inf_bucket = sample(scrape, "llmos_inference_batch_size_bucket", le="+Inf")
    assert inf_bucket == sample(scrape, "llmos_inference_batch_size_count")
    assert (sample(scrape, "llmos_inference_batch_size_sum") or 0.0) >= 2

    # One failed attempt, then a delivered one, to a real receiver.
    with receiver(script=[500]) as rx:
        created = api.http.post("/v1/webhook_endpoints", json={"url": rx.url, "events": ["fine_tuning.job.failed"]})
        assert created.status_code == 200, created.text
        file_id = api.upload('{"text": "", "label": "a"}\n').json()["id"]
        job = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id})
        assert job.status_code == 200, job.text
        scrape = _scrape_until(
            anon, "a failed and a succeeded webhook attempt",
            lambda text: (sample(text, "llmos_webhook_attempts_last_5m", outcome="failed") or 0) >= 1
            and (sample(text, "llmos_webhook_attempts_last_5m", outcome="succeeded") or 0) >= 1)
    assert sample(scrape, "llmos_webhook_deliveries", status="pending") == 0
    assert sample(scrape, "llmos_webhook_deliveries", status="failed") == 0


def test_a_running_job_reports_its_throughput_and_heartbeat(api: Api, anon: Api) -> None:
    file_id = api.upload(jsonl(sentiment_rows(200))).json()["id"]
    job = api.http.post("/v1/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": file_id,
                                                      "hyperparameters": {"n_epochs": 50, "batch_size": 4}}).json()

    def running_with_progress(text: str) -> bool:
        return (sample(text, "llmos_training_samples_per_second") or 0.0) > 0 \
            and sample(text, "llmos_worker_heartbeat_age_seconds", queue="gpu") is not None

    scrape = _scrape_until(anon, "the running job's throughput and heartbeat", running_with_progress, 120)
    # Heartbeats come every 0.3 s in the suite; a few seconds' age would mean the gauge reads the wrong rows.
    assert (sample(scrape, "llmos_worker_heartbeat_age_seconds", queue="gpu") or 0.0) < 5
    assert api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    api.wait_status(job["id"], {"cancelled"})
    idle = _scrape_until(anon, "the heartbeat series to end with the job",
                         lambda text: sample(text, "llmos_worker_heartbeat_age_seconds", queue="gpu") is None)
    assert sample(idle, "llmos_training_samples_per_second") == 0


def test_the_dashboard_is_valid_json_for_grafana_import() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    # Panels name the datasource variable, so importing (UI or provisioning) asks for one Prometheus.
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
