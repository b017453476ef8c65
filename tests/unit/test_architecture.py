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


# Production code never depends on dev-only tools (the Stripe emulator, benches, the dev
# stack): a reader of meterline/stripe/ sees only what runs against Stripe.
PACKAGE = CORE.parent
PRODUCTION = sorted(p for p in PACKAGE.rglob("*.py") if "devstack" not in p.relative_to(PACKAGE).parts
                    and p.name != "cli.py")  # the CLI dispatches to `meterline dev` lazily


@pytest.mark.parametrize("module", PRODUCTION, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_production_module_imports_no_devstack(module: Path) -> None:
    bad = {n for n in _imports(module) if n == "meterline.devstack" or n.startswith("meterline.devstack.")}

    assert not bad, f"{module.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_stripe_package_holds_no_emulator() -> None:
    names = {p.stem for p in (PACKAGE / "stripe").glob("*.py")}

    assert not names & {"emulator", "_routes", "_triggers", "_wire", "objects", "webhooks"}
    assert (PACKAGE / "devstack" / "stripe_emulator" / "emulator.py").exists()
