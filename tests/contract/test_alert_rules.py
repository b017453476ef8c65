"""The alert rules, tested with Prometheus' own tools.

- `promtool check config` on deploy/prometheus/prometheus.yml (its `rule_files` pointed at
  the repository's alerts.yml; in a container it is mounted at /etc/prometheus);
- `promtool test rules` on deploy/prometheus/tests/*.yml: for every alert a case where it
  fires (with its exact labels and rendered annotations) and one where it stays silent;
- a contract: every alert in alerts.yml has both kinds of case, so an alert added later
  without tests fails here, and the tests name no alert that does not exist.

Without promtool the promtool tests are skipped (never passed); CI installs it (.ci/run).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS_FILE = PROMETHEUS_DIR / "alerts.yml"
CONFIG_FILE = PROMETHEUS_DIR / "prometheus.yml"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (apt-get install prometheus; .ci/run does it)")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def alert_names() -> list[str]:
    groups = yaml.safe_load(ALERTS_FILE.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def rule_cases() -> list[tuple[str, str, bool]]:
    """(test file, alert name, fires?) for every alert_rule_test in the rule tests."""
    cases = []
    for path in RULE_TESTS:
        doc: dict[str, Any] = yaml.safe_load(path.read_text())
        assert [Path(f).name for f in doc["rule_files"]] == [ALERTS_FILE.name], path.name
        for test in doc["tests"]:
            for case in test.get("alert_rule_test") or []:
                cases.append((path.name, case["alertname"], bool(case.get("exp_alerts"))))
    return cases


# --- the contract: every alert is tested both ways ------------------------------------

def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    cases = rule_cases()
    firing = {name for _, name, fires in cases if fires}
    silent = {name for _, name, fires in cases if not fires}
    alerts = set(alert_names())
    assert len(alerts) >= 10
    assert not alerts - firing, f"alerts without a case where they fire: {sorted(alerts - firing)}"
    assert not alerts - silent, f"alerts without a case where they stay silent: {sorted(alerts - silent)}"


def test_rule_tests_name_only_existing_alerts() -> None:
    unknown = {name for _, name, _ in rule_cases()} - set(alert_names())
    assert not unknown, f"rule tests for alerts that do not exist: {sorted(unknown)}"


# --- promtool -------------------------------------------------------------------------

def test_prometheus_config_passes_promtool_check_config(tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG_FILE.read_text())
    assert [Path(f).name for f in config["rule_files"]] == [ALERTS_FILE.name]
    config["rule_files"] = [str(ALERTS_FILE)]  # mounted at /etc/prometheus in the container
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run("check", "config", str(checked))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_alert_rules_pass_promtool_check_rules() -> None:
    result = run("check", "rules", str(ALERTS_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_names())} rules found" in result.stdout


@pytest.mark.parametrize("rule_test", RULE_TESTS, ids=lambda p: p.name)
def test_alert_rule_unit_tests_pass(rule_test: Path) -> None:
    result = run("test", "rules", str(rule_test))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_fail_when_an_alert_is_broken(tmp_path: Path) -> None:
    """The harness can fail: with one threshold moved, its firing case must not pass."""
    broken = ALERTS_FILE.read_text().replace(") > 0.8 * 2000000", ") > 0.9 * 2000000")
    assert broken != ALERTS_FILE.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "tests").mkdir()
    copy = tmp_path / "tests" / "processor.yml"
    shutil.copy(PROMETHEUS_DIR / "tests" / "processor.yml", copy)
    result = run("test", "rules", str(copy))
    assert result.returncode != 0
    assert "MeterlinePendingEventsNearBackpressure" in result.stdout + result.stderr
