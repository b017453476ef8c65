"""Contract tests for deploy/prometheus and deploy/grafana: parsed and cross-checked, not run.

Pure and fast (no Prometheus, no Grafana):

- every `meterline_*` name in a dashboard query, an alert expression or an alert's
  annotations is a series meterline actually exports (derived from the live
  prometheus_client registry after importing `meterline.metrics`);
- every metric defined in metrics.py is shown on the dashboard (or listed in
  NOT_ON_DASHBOARD with a reason);
- the dashboard is provisionable (uid "meterline", datasource by `${DS_PROMETHEUS}`,
  unique panel ids, units set), every alert has `for`, a severity, a summary and a
  description with a runbook hint;
- prometheus.yml scrapes the compose services on their metrics ports and loads alerts.yml;
  the Grafana provisioning points at that Prometheus and at the dashboard directory.

promtool's checks and the alert rules' unit tests are in test_alert_rules.py;
tests/e2e/test_idle_alerts.py evaluates the rules on a real processor's metrics.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import meterline.metrics as metrics_module
from meterline.config import load_settings
from meterline.devstack import prometheus

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "meterline.json"
ALERTS_FILE = PROMETHEUS_DIR / "alerts.yml"
PROMETHEUS_FILE = PROMETHEUS_DIR / "prometheus.yml"
DATASOURCE_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_FILE = GRAFANA_DIR / "provisioning" / "dashboards" / "meterline.yml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
CONFIG_FILE = ROOT / "deploy" / "meterline.yaml"

METRIC_NAME = re.compile(r"meterline_[a-z0-9_]+")

# Metrics deliberately left off the dashboard: family name -> reason. Keep it short; an
# entry whose metric is on the dashboard anyway (or no longer exists) fails the test.
NOT_ON_DASHBOARD: dict[str, str] = {}

# The series Prometheus stores for each metric type (prometheus_client exposition).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}

DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
ALERTS: dict[str, Any] = yaml.safe_load(ALERTS_FILE.read_text())
PROMETHEUS: dict[str, Any] = yaml.safe_load(PROMETHEUS_FILE.read_text())


# --- what meterline exports -----------------------------------------------------------

def defined_families() -> dict[str, str]:
    """Family name -> type of every metric object defined in meterline/metrics.py."""
    out: dict[str, str] = {}
    for value in vars(metrics_module).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                out[family.name] = family.type
    return out


def exported_families() -> dict[str, set[str]]:
    """Family name -> the sample names Prometheus will store for it, from the registry.

    A labelled metric with no children yet has no samples, so the names are derived from
    the type as well. The bare family name of a counter or histogram is *not* a series
    (`meterline_records_in` returns nothing; `meterline_records_in_total` is the counter),
    so it is only accepted where the type makes it one (gauges).
    """
    out: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("meterline_"):
            continue
        names = {family.name + suffix for suffix in SUFFIXES[family.type]}
        names |= {sample.name for sample in family.samples}
        out[family.name] = names
    return out


EXPORTED = exported_families()
EXPORTED_NAMES = set().union(*EXPORTED.values())
FAMILY_OF = {name: family for family, names in EXPORTED.items() for name in names}


def unknown_names(exprs: list[str]) -> dict[str, list[str]]:
    """meterline_* identifiers in `exprs` that meterline does not export -> the exprs."""
    unknown: dict[str, list[str]] = {}
    for expr in exprs:
        for name in METRIC_NAME.findall(expr):
            if name not in EXPORTED_NAMES:
                unknown.setdefault(name, []).append(expr)
    return unknown


# --- what the dashboard and the alerts use --------------------------------------------

def dashboard_exprs() -> list[str]:
    return prometheus.dashboard_exprs(DASHBOARD)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in ALERTS["groups"] for rule in group["rules"] if "alert" in rule]


def alert_exprs() -> list[str]:
    return prometheus.alert_exprs(ALERTS)


# --- the checker itself can fail ------------------------------------------------------

def test_exported_names_match_the_metrics_module() -> None:
    defined = defined_families()
    assert defined, "no metrics found in meterline.metrics"
    assert set(defined) == set(EXPORTED), "registry and metrics.py disagree"
    assert "meterline_records_in_total" in EXPORTED_NAMES
    assert "meterline_event_to_debit_latency_seconds_bucket" in EXPORTED_NAMES
    assert "meterline_pending_events" in EXPORTED_NAMES
    assert "meterline_dlq_messages_total" in EXPORTED_NAMES  # labelled, possibly no children


@pytest.mark.parametrize("expr", [
    "rate(meterline_bogus_total[5m])",
    "sum(rate(meterline_records_in[5m]))",                    # counter without _total
    "meterline_flush_duration_seconds > 1",                   # histogram without a suffix
    "meterline_pending_events_total",                         # gauge with a counter suffix
])
def test_checker_rejects_names_meterline_does_not_export(expr: str) -> None:
    assert unknown_names([expr])


# --- the dashboard --------------------------------------------------------------------

def test_dashboard_is_provisionable() -> None:
    assert DASHBOARD["uid"] == "meterline"
    assert DASHBOARD["title"]
    assert DASHBOARD["schemaVersion"] >= 36
    panels = list(prometheus.walk_panels(DASHBOARD["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in {"${DS_PROMETHEUS}", "prometheus"}, panel["title"]
        assert panel.get("targets"), f"panel {panel['title']!r} has no queries"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"empty query in {panel['title']!r}"
            assert target["datasource"]["uid"] == panel["datasource"]["uid"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"no unit on {panel['title']!r}"


def test_dashboard_has_the_expected_rows() -> None:
    rows = {p["title"] for p in prometheus.walk_panels(DASHBOARD["panels"]) if p["type"] == "row"}
    assert {"Throughput", "Freshness", "Backlog", "Bad input", "Ledger", "Health"} <= rows


def test_dashboard_queries_use_only_exported_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    assert unknown_names(exprs) == {}


def test_every_metric_is_on_the_dashboard() -> None:
    shown = {FAMILY_OF[n] for e in dashboard_exprs() for n in METRIC_NAME.findall(e)
             if n in FAMILY_OF}
    defined = set(defined_families())
    missing = defined - shown - set(NOT_ON_DASHBOARD)
    assert not missing, f"metrics not on the dashboard (add a panel or list in NOT_ON_DASHBOARD): {sorted(missing)}"
    assert set(NOT_ON_DASHBOARD) <= defined, "NOT_ON_DASHBOARD names a metric that does not exist"
    assert not set(NOT_ON_DASHBOARD) & shown, "NOT_ON_DASHBOARD names a metric that is shown"


# --- the alerts -----------------------------------------------------------------------

def test_alert_expressions_use_only_exported_metrics() -> None:
    assert unknown_names(alert_exprs()) == {}


def test_alert_annotations_name_only_exported_metrics() -> None:
    texts = [str(value) for rule in alert_rules() for value in rule.get("annotations", {}).values()]
    assert unknown_names(texts) == {}


def test_every_alert_is_complete() -> None:
    rules = alert_rules()
    assert len(rules) >= 10
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", name), name
        assert str(rule.get("expr", "")).strip(), name
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no `for`"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        assert "runbook" in annotations.get("description", "").lower(), f"{name}: no runbook hint"


@pytest.mark.parametrize(("alert", "metric"), [
    ("MeterlineConsumerLagHigh", "meterline_consumer_lag_seconds"),
    ("MeterlineDlqMessages", "meterline_dlq_messages_total"),
    ("MeterlineInvalidEventsSpike", "meterline_events_invalid_total"),
    ("MeterlineProcessorNotCommitting", "meterline_last_flush_commit_timestamp_seconds"),
    ("MeterlineStripeCircuitOpen", "meterline_stripe_circuit_open"),
    ("MeterlineStripeFailures", "meterline_stripe_requests_total"),
    ("MeterlineReconcileVariance", "meterline_reconcile_variance_ratio"),
    ("MeterlineProcessorNotCommitting", "meterline_owned_partitions"),
    ("MeterlineFlushFailures", "meterline_flush_failures_total"),
    ("MeterlineFencedFlushes", "meterline_fenced_flushes_total"),
    ("MeterlineOutboxOldestAgeHigh", "meterline_outbox_oldest_age_seconds"),
    ("MeterlineOutboxFailures", "meterline_outbox_failures_total"),
    ("MeterlineEventToDebitLatencyHigh", "meterline_event_to_debit_latency_seconds_bucket"),
    ("MeterlinePendingEventsNearBackpressure", "meterline_pending_events"),
])
def test_alert_watches_its_metric(alert: str, metric: str) -> None:
    rule = {r["alert"]: r for r in alert_rules()}[alert]
    assert metric in METRIC_NAME.findall(rule["expr"])


def test_backpressure_alert_matches_the_configured_limit() -> None:
    """max_pending_events is not exported, so the alert hard-codes it: keep them in step."""
    limit = yaml.safe_load(CONFIG_FILE.read_text())["processor"]["max_pending_events"]
    rule = {r["alert"]: r for r in alert_rules()}["MeterlinePendingEventsNearBackpressure"]
    assert str(limit) in rule["expr"]


# --- Prometheus and Grafana wiring ----------------------------------------------------

def test_prometheus_loads_the_alert_rules() -> None:
    rule_files = PROMETHEUS["rule_files"]
    assert any(Path(f).name == ALERTS_FILE.name for f in rule_files)


def scrape_targets(job: dict[str, Any]) -> set[tuple[str, int]]:
    targets: set[tuple[str, int]] = set()
    for sd in job.get("dns_sd_configs", []):
        targets |= {(name, int(sd["port"])) for name in sd["names"]}
    for static in job.get("static_configs", []):
        for target in static["targets"]:
            host, _, port = target.rpartition(":")
            targets.add((host, int(port)))
    return targets


def test_prometheus_scrapes_the_compose_services_on_their_metrics_ports() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    settings = load_settings(CONFIG_FILE)
    jobs = {j["job_name"]: j for j in PROMETHEUS["scrape_configs"]}
    for service, port in [("processor", settings.processor.metrics_port),
                          ("relay", settings.relay.metrics_port)]:
        assert service in compose
        assert str(port) in [str(p).split("/")[0] for p in compose[service].get("expose", [])]
        assert (service, port) in scrape_targets(jobs[service]), service
        # Every replica: DNS discovery of the service name, not one fixed address.
        assert jobs[service].get("dns_sd_configs"), f"{service}: use dns_sd_configs"


def test_alerts_and_dashboard_select_jobs_that_are_scraped() -> None:
    jobs = {j["job_name"] for j in PROMETHEUS["scrape_configs"]}
    used = set()
    for expr in alert_exprs() + dashboard_exprs():
        used |= set(re.findall(r'job="([^"]+)"', expr))
        for alternatives in re.findall(r'job=~"([^"]+)"', expr):
            used |= set(alternatives.split("|"))
    assert used and used <= jobs


def test_grafana_provisioning() -> None:
    datasources = yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"]
    prometheus = next(d for d in datasources if d["type"] == "prometheus")
    assert prometheus["uid"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["current"]["value"] == prometheus["uid"]

    providers = yaml.safe_load(DASHBOARD_PROVIDER_FILE.read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"


def unbalanced(expr: str) -> bool:
    """Brackets out of balance (outside string literals): a cheap stand-in for promtool."""
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return True
    return bool(stack)


def test_queries_have_balanced_brackets() -> None:
    assert unbalanced("sum(rate(x[5m])")
    assert [e for e in alert_exprs() + dashboard_exprs() if unbalanced(e)] == []
