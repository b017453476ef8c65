"""The functional core decides money and must stay pure: no Kafka, Postgres, HTTP or Faust."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "services" / "meterline" / "core"
FORBIDDEN = (
    "aiokafka", "asyncpg", "confluent_kafka", "faust", "mode", "aiohttp", "stripe", "prometheus_client",
    "meterline.storage", "meterline.processor", "meterline.relay", "meterline.devstack",
    "meterline.metrics", "socket", "subprocess",
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


# The ledger's decisions (which accounts pay, credit-backs, expiry) are pure like the core.
PURE = [*sorted(CORE.glob("*.py")), CORE.parent / "ledger" / "accounts.py"]


@pytest.mark.parametrize("module", PURE, ids=lambda p: p.name)
def test_core_module_imports_no_io(module: Path) -> None:
    bad = {n for n in _imports(module) for f in FORBIDDEN if n == f or n.startswith(f + ".")}

    assert not bad, f"{module.name} imports {sorted(bad)}"


def test_the_rule_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import asyncpg\nfrom meterline.storage.flush import flush\n")

    assert _imports(sample) == {"asyncpg", "meterline.storage.flush"}
