"""A real Prometheus scraping a real run: `meterline dev --prometheus` for 60 s, then every
expression of the dashboard and the alert rules queried through Prometheus' HTTP API.

The rule for what counts as finding data is in meterline/devstack/prometheus.py: a
dashboard expression returns a non-empty vector, unless the only series it lacks are of a
labelled counter no event has created yet (an error or rejection counter on a healthy run)
that its job does export; an alert expression (a condition, empty when healthy) reads only
series that exist or families its job exports. Two expressions that must fail — a metric
nobody exports and a job that does not exist — are added to a copy of the dashboard, so
the check is known to be able to fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meterline.devstack import prometheus as dev_prometheus

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
BROKEN = [
    'sum(rate(meterline_bogus_total{job="processor"}[1m]))',   # no such metric
    'max(meterline_pending_events{job="processer"})',          # no such job
]


def test_every_dashboard_and_alert_expression_finds_data_in_a_real_prometheus(
        tmp_path: Path) -> None:
    if dev_prometheus.binary() is None:
        pytest.skip("prometheus not installed (apt-get install prometheus; .ci/run does it)")
    deploy = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", deploy)
    dashboard_file = deploy / "grafana" / "dashboards" / "meterline.json"
    dashboard = json.loads(dashboard_file.read_text())
    probe = json.loads(json.dumps(dashboard["panels"][1]))  # a panel, as the dashboard has them
    probe["id"], probe["title"] = 9999, "broken on purpose (test)"
    probe["targets"] = [{**probe["targets"][0], "expr": e, "refId": f"B{i}"}
                        for i, e in enumerate(BROKEN)]
    dashboard["panels"].append(probe)
    dashboard_file.write_text(json.dumps(dashboard))
    rules = yaml.safe_load((deploy / "prometheus" / "alerts.yml").read_text())
    expected_exprs = (len(dev_prometheus.dashboard_exprs(dashboard))
                      + len(dev_prometheus.alert_exprs(rules)))

    env = {k: v for k, v in os.environ.items()
           if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")}  # its own broker and Postgres
    done = subprocess.run(
        [sys.executable, "-m", "meterline.cli", "dev", "--duration", "60", "--headless",
         "--prometheus", "--deploy-dir", str(deploy), "--customers", "50", "--rate", "300",
         "--workdir", str(tmp_path / "dev")],
        capture_output=True, text=True, timeout=600, env=env)
    assert done.stdout.strip(), done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    prom = summary["prometheus"]

    assert summary["ledger_matches_expected"] is True, summary   # the run stays exact
    assert prom["expressions_checked"] == expected_exprs
    failed = {f["expr"] for f in prom["failed"]}
    assert failed == set(BROKEN), prom["failed"]                  # and nothing else
    assert done.returncode == 1                                    # failures fail the run
    # Most dashboard queries show data; the rest lack only never-incremented counters.
    assert prom["dashboard_with_data"] >= 0.6 * len(dev_prometheus.dashboard_exprs(dashboard))
    empty = prom["dashboard_empty_exported_only"] + prom["alert_selectors_exported_only"]
    assert all(s.split("{")[0].endswith("_total") for s in empty), empty
    # Lag in seconds, scraped from every consumer group meterline runs.
    assert prom["lag_seconds_groups"] == [
        "meterline-ledger-consumer", "meterline-processor", "meterline-stripe-sink"]
