"""An idle topic pages nobody: no critical alert is true on a real processor's idle metrics.

A processor subprocess takes a burst of events, debits them, and then sees nothing more.
Its /metrics, scraped for real once it is idle, become promtool series that stay
constant for 15 minutes (idle means nothing moves; timestamps are shifted so the scrape
is promtool's time 0), and `promtool test rules` evaluates every critical alert of
deploy/prometheus/alerts.yml on them: none may fire. A control case with the pending
gauge stuck at 3 (the bug of issue 9: set on add, never after a flush) must fire
MeterlineProcessorNotCommitting, so the evaluation is known to be live.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.harness import (
    Sample,
    assert_exact,
    db_pool,
    fleet,
    metric_value,
    scrape,
    wait_for_ledger,
    wait_for_owners,
    wait_until,
)
from meterline.config import Settings
from meterline.devstack.embedded import _free_port
from meterline.devstack.load import LoadGenerator, customer_ids

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
IDLE_MINUTES = 15
TARGET = {"job": "processor", "instance": "w0"}


def critical_alerts() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"]
            if r.get("labels", {}).get("severity") == "critical"]


def series(samples: list[Sample], scraped_at: float, **override: float) -> list[dict[str, str]]:
    """promtool input series: each meterline sample held constant for IDLE_MINUTES.

    Timestamps move to promtool's clock, where the scrape happens at time 0.
    """
    out = [{"series": _selector("up", TARGET), "values": f"1+0x{IDLE_MINUTES}"}]
    for s in samples:
        if not s.name.startswith("meterline_"):
            continue
        value = override.get(s.name, s.value)
        if s.name.endswith("_timestamp_seconds") and value:
            value -= scraped_at
        out.append({"series": _selector(s.name, {**s.labels, **TARGET}),
                    "values": f"{value!r}+0x{IDLE_MINUTES}"})
    return out


def _selector(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def promtool_case(input_series: list[dict[str, str]],
                  expected: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": input_series,
        "alert_rule_test": [{"eval_time": f"{IDLE_MINUTES}m", "alertname": name, "exp_alerts": alerts}
                            for name, alerts in expected.items()],
    }


async def test_idle_topic_fires_no_critical_alert(
    pipeline_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; .ci/run does it)")
    port = _free_port()
    settings = pipeline_settings(customers=20, processor={"metrics_port": port})
    with fleet(settings, tmp_path, "w0") as workers:
        async with db_pool(settings.database_url) as pool:
            await wait_for_owners(pool, settings, {"w0"}, workers=workers)
            gen = LoadGenerator(settings, customer_ids(20), duplicates=0, late=0, invalid=0, seed=4)
            now_ms = int(datetime.now(UTC).timestamp() * 1000)
            for _ in range(2000):  # the initial burst, then nothing
                customer, body = gen.make_event(now_ms)
                gen.producer.produce(settings.kafka.usage_topic, body, customer.encode())
            gen.flush()
            assert_exact(await wait_for_ledger(pool, gen, timeout=45, workers=workers), gen)

            async def idle() -> list[Sample] | None:
                samples = scrape(port)
                pending = metric_value(samples, "meterline_pending_events")
                debited = metric_value(samples, "meterline_events_debited_total")
                return samples if pending == 0 and debited == gen.stats.events_sent else None

            samples: list[Sample] = await wait_until(idle, 15, "the processor idle", workers)
            await asyncio.sleep(3)  # idle for a while: the gauges must stay true
            samples, scraped_at = scrape(port), time.time()
            assert metric_value(samples, "meterline_pending_events") == 0
            assert metric_value(samples, "meterline_owned_partitions") == settings.kafka.partitions
            assert metric_value(samples, "meterline_last_flush_commit_timestamp_seconds") > 0
            # Lag in seconds for the processor's group: every owned partition, nothing waiting.
            lag = [s for s in samples if s.name == "meterline_consumer_lag_seconds"
                   and s.labels.get("group") == settings.kafka.consumer_group]
            assert len(lag) == settings.kafka.partitions, lag
            assert {s.value for s in lag} == {0.0}
            # A healthy run: no gap was found, no run abandoned, nothing stalled.
            for healthy_at_zero in ("meterline_intake_gaps_total", "meterline_agent_crashes_total",
                                    "meterline_intake_stalled", "meterline_intake_internal_errors_total"):
                assert metric_value(samples, healthy_at_zero) == 0, healthy_at_zero

    critical = critical_alerts()
    assert "MeterlineProcessorNotCommitting" in critical
    # The shipped rules without their annotations (promtool compares those too; what
    # matters here is which expressions are true).
    groups = yaml.safe_load(ALERTS.read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(groups, sort_keys=False))
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            promtool_case(series(samples, scraped_at), {name: [] for name in critical}),
            # Control: the stale pending gauge of issue 9 pages on the same idle metrics.
            promtool_case(series(samples, scraped_at, meterline_pending_events=3), {
                "MeterlineProcessorNotCommitting": [
                    {"exp_labels": {"severity": "critical", **TARGET}}]}),
        ],
    }
    test_file = tmp_path / "idle-alerts.test.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = await asyncio.to_thread(
        subprocess.run, [promtool, "test", "rules", str(test_file)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
