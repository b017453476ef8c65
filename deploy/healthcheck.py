"""Container healthcheck for meterline services (stdlib only; used by deploy/Dockerfile).

    python /usr/local/lib/meterline/healthcheck.py [PORT]

Healthy when the service's Prometheus endpoint (http://127.0.0.1:PORT/metrics) answers
200. PORT is the argument, else $METERLINE_HEALTH_PORT; with neither (one-shot commands
such as `migrate`, `topics`, `load`) the check passes. Services serve /metrics from the
moment they start (processor.metrics_port 9464, relay.metrics_port 9465), so this
says "the process is up and serving", not "it is keeping up": alert on
meterline_consumer_lag_messages and meterline_outbox_oldest_age_seconds for that.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(port: int, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str]) -> int:
    raw = argv[1] if len(argv) > 1 else os.environ.get("METERLINE_HEALTH_PORT", "")
    if not raw or raw == "0":
        return 0
    try:
        port = int(raw)
    except ValueError:
        print(f"healthcheck: bad port {raw!r}", file=sys.stderr)
        return 1
    if check(port):
        return 0
    print(f"healthcheck: nothing healthy on http://127.0.0.1:{port}/metrics", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
