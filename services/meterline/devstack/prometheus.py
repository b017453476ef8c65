"""`meterline dev --prometheus`: a real Prometheus scraping the dev run, and a check that
every expression the dashboard and the alert rules use finds data in it.

Prometheus is Debian's (`/usr/bin/prometheus`, or `prometheus` on PATH), started with a
generated config that scrapes each dev service's /metrics under the job name the
dashboard and the rules select (`processor`, `relay`, `stripe-sink`, ...), every second,
and loads the alert rules. Nothing here is used in production.

The rule for "finds data" (`check`), and why:

- A **dashboard expression** must return a non-empty vector. Where it is empty, it passes
  only if every selector in it that matches no series names a metric family that the
  selected job does export (Prometheus' target metadata has it) — a labelled counter with
  no child yet, such as flush failures or Stripe rejections on a healthy run: nothing has
  happened, so there is no series to show, and an error rate is legitimately empty.
- An **alert expression** is a condition, empty on a healthy run by design; what can be
  wrong in a real deployment is that it looks at series that do not exist (a renamed
  metric, a wrong `job`). So each of its selectors must match series, or name a family
  the selected job exports (as above). That the conditions fire when they should is
  `promtool test rules`' job (deploy/prometheus/tests).

Anything else fails: a selector naming a metric no target of that job exports, or a
dashboard expression that is empty although every series it reads exists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCRAPE_INTERVAL_S = 1
# Grafana variables in dashboard queries, as a query against all instances would set them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$processor": ".*"}
# A metric selector: a name, optionally followed by its label matchers.
SELECTOR = re.compile(r"\b(meterline_[a-z0-9_]+|up)\b(\{[^}]*\})?")
JOB_MATCHER = re.compile(r'job(=~?)"([^"]*)"')
SERIES_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created", "_info")


def binary() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)


# --- the expressions the dashboard and the rules use ----------------------------------

def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels") or [])


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every panel query and query variable of a Grafana dashboard."""
    exprs = []
    for panel in walk_panels(dashboard["panels"]):
        exprs += [t["expr"] for t in panel.get("targets") or [] if t.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            exprs.append(query)
    return exprs


def alert_exprs(rules: dict[str, Any]) -> list[str]:
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def promql(expr: str) -> str:
    """A dashboard query as Prometheus can run it: Grafana variables filled in, and
    `label_values(selector, label)` (a Grafana function) as its selector."""
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    if m := re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", expr, re.S):
        expr = m.group(1)
    return expr


# --- a Prometheus process --------------------------------------------------------------

def scrape_config(targets: dict[str, int], rule_files: list[Path]) -> dict[str, Any]:
    """Prometheus config: job name -> local /metrics port, scraped every second."""
    return {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                   "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for job, port in sorted(targets.items())
        ],
    }


@dataclass
class Prometheus:
    workdir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, targets: dict[str, int], rule_files: list[Path]) -> None:
        exe = binary()
        if exe is None:
            raise RuntimeError("prometheus not installed (apt-get install prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(targets, rule_files), sort_keys=False))
        log = open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.workdir / "prometheus.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"prometheus did not start:\n{tail}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [data]
        return result

    def exported(self) -> set[tuple[str, str]]:
        """(job, metric family) for every family a scraped target declares, samples or not."""
        return {(m["target"].get("job", ""), m["metric"]) for m in self.api("targets/metadata")}


# --- the check -------------------------------------------------------------------------

@dataclass
class Verdict:
    expr: str
    source: str                                    # "dashboard" or "alert"
    data: bool = False                             # the expression itself returned data
    exported_only: list[str] = field(default_factory=list)  # empty selectors, family exported
    missing: list[str] = field(default_factory=list)        # why it fails, if it does

    @property
    def ok(self) -> bool:
        return not self.missing


def _jobs_match(selector_labels: str, job: str) -> bool:
    m = JOB_MATCHER.search(selector_labels or "")
    if m is None:
        return True
    op, value = m.groups()
    return job == value if op == "=" else re.fullmatch(value, job) is not None


def _families(name: str) -> set[str]:
    out = {name}
    for suffix in SERIES_SUFFIXES:
        if name.endswith(suffix):
            out.add(name[: -len(suffix)])
    return out


def judge(prom: Prometheus, expr: str, source: str,
          exported: set[tuple[str, str]]) -> Verdict:
    verdict = Verdict(expr, source)
    runnable = promql(expr)
    if source == "dashboard" and prom.query(runnable):
        verdict.data = True
        return verdict
    selectors = list(SELECTOR.finditer(runnable))
    if not selectors:
        verdict.missing.append("(no metric selector)")
    for m in selectors:
        name, labels = m.group(1), m.group(2) or ""
        selector = name + labels
        if prom.query(selector):
            continue
        if any(f in _families(name) and _jobs_match(labels, job) for job, f in exported):
            verdict.exported_only.append(selector)
        else:
            verdict.missing.append(selector)
    if source == "dashboard" and not verdict.exported_only and not verdict.missing:
        # Its series exist, yet the panel would be blank: a wrong aggregation or filter.
        verdict.missing.append("(empty although every selector has series)")
    return verdict


def check(prom: Prometheus, dashboard: dict[str, Any], rules: dict[str, Any]) -> list[Verdict]:
    exported = prom.exported()
    return ([judge(prom, e, "dashboard", exported) for e in dashboard_exprs(dashboard)]
            + [judge(prom, e, "alert", exported) for e in alert_exprs(rules)])


def summary(verdicts: list[Verdict]) -> dict[str, Any]:
    """The `prometheus` entry of `meterline dev --headless`'s JSON summary."""
    dashboard = [v for v in verdicts if v.source == "dashboard"]
    return {
        "expressions_checked": len(verdicts),
        "dashboard_with_data": sum(v.data for v in dashboard),
        "dashboard_empty_exported_only": sorted({s for v in dashboard if not v.data
                                                 for s in v.exported_only}),
        "alert_selectors_exported_only": sorted({s for v in verdicts if v.source == "alert"
                                                 for s in v.exported_only}),
        "failed": [{"expr": " ".join(v.expr.split()), "missing": v.missing}
                   for v in verdicts if not v.ok],
    }
