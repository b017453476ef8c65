"""What docker-compose.yml and deploy/k8s/ must agree on: the services, their ports, the
secrets each one gets, and the meterline commands they run (parsed by the real CLI).

Shared by tests/contract/test_compose.py and tests/contract/test_k8s.py.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

import pytest

from meterline.cli import build_parser
from meterline.config import Settings

# Long-running service -> (port it listens on, the path its health check asks for). The
# ports are the config defaults (PORT_SETTING) and are distinct, so a service keeps its
# port wherever it runs (all on one host in `meterline dev`). The workers serve /metrics,
# /healthz and /readyz on their metrics port (reconcile, a periodic job, only /metrics); the
# api and the bridge serve all three on their HTTP port.
SERVICE_PORTS: dict[str, tuple[int, str]] = {
    "processor": (9464, "/readyz"),
    "relay": (9465, "/readyz"),
    "stripe-sink": (9466, "/readyz"),
    "reconcile": (9467, "/metrics"),
    "ledger-consumer": (9468, "/readyz"),
    "webhook-bridge": (8081, "/readyz"),
    "api": (8080, "/readyz"),
    "stripe-emulator": (12111, "/_emulator/errors"),  # dev only: not on Kubernetes
}
HTTP_SERVICES = frozenset({"webhook-bridge", "api"})
# Services whose liveness (/healthz) and readiness (/readyz) are probed (meterline/health.py).
PROBED_SERVICES = HTTP_SERVICES | {"processor", "relay", "stripe-sink", "ledger-consumer"}

# Service -> the Settings field holding its port.
PORT_SETTING = {
    "processor": "processor.metrics_port",
    "relay": "relay.metrics_port",
    "stripe-sink": "stripe.metrics_port",
    "reconcile": "reconcile.metrics_port",
    "ledger-consumer": "ledger_consumer.metrics_port",
    "webhook-bridge": "webhook_bridge.port",
    "api": "api.port",
}

# Secrets, read from the environment by the services that use them (and only those).
SECRETS_USED = {
    "stripe-sink": {"STRIPE_API_KEY"},
    "reconcile": {"STRIPE_API_KEY"},
    "webhook-bridge": {"STRIPE_WEBHOOK_SECRETS"},
    "api": {"METERLINE_API_TOKENS"},
}

def subcommands() -> set[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    assert len(actions) == 1
    return set(actions[0].choices)


def check_meterline_argv(where: str, argv: list[str]) -> argparse.Namespace:
    """Parse `meterline <argv>` with the real parser; fail naming `where` if it does not."""
    known = subcommands()
    assert argv, f"{where}: empty meterline command"
    assert argv[0] in known, f"{where}: {argv} is not one of {sorted(known)}"
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports bad options by exiting
        pytest.fail(f"{where}: `meterline {shlex.join(argv)}` does not parse ({exc})")


def setting(settings: Settings, dotted: str) -> Any:
    """The value at a dotted path, e.g. `processor.metrics_port`."""
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def configured_ports(settings: Settings) -> dict[str, int]:
    """Every `*port` field of the settings tree that is set (dotted path -> port)."""
    out: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        for name in type(node).model_fields:
            value = getattr(node, name)
            if hasattr(type(value), "model_fields"):
                walk(value, f"{prefix}{name}.")
            elif name.endswith("port") and isinstance(value, int) and value:
                out[prefix + name] = value

    walk(settings, "")
    return out
