"""Container healthcheck for meterline services (stdlib only; used by deploy/Dockerfile).

    python /usr/local/lib/meterline/healthcheck.py [PORT [PATH]]

Healthy when http://127.0.0.1:PORT/PATH answers 200; PATH defaults to /metrics (served
by every worker from the moment it starts: processor 9464, relay 9465, stripe-sink 9466,
reconcile 9467, ledger-consumer 9468). docker-compose.yml passes each service's readiness
path, `/readyz` (Postgres and Kafka answer), for every service but reconcile, which serves
only /metrics. PORT is the argument, else $METERLINE_HEALTH_PORT; with neither (one-shot
commands such as `migrate`, `topics`, `load`) the check passes.

Readiness is not "keeping up": alert on meterline_consumer_lag_messages and
meterline_outbox_oldest_age_seconds for that.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(port: int, path: str = "/metrics", timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str]) -> int:
    raw = argv[1] if len(argv) > 1 else os.environ.get("METERLINE_HEALTH_PORT", "")
    path = argv[2] if len(argv) > 2 else "/metrics"
    if not raw or raw == "0":
        return 0
    try:
        port = int(raw)
    except ValueError:
        print(f"healthcheck: bad port {raw!r}", file=sys.stderr)
        return 1
    if not path.startswith("/"):
        print(f"healthcheck: path must start with '/': {path!r}", file=sys.stderr)
        return 1
    if check(port, path):
        return 0
    print(f"healthcheck: nothing healthy on http://127.0.0.1:{port}{path}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
